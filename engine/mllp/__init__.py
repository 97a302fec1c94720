"""mllp"""
