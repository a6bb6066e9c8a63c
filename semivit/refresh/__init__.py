"""semivit.refresh"""
