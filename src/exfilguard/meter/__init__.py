"""exfilguard.meter"""
