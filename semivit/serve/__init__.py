"""semivit.serve"""
