"""semivit.trainer"""
