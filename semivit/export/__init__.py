"""semivit.export"""
