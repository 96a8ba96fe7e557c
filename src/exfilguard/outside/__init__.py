"""exfilguard.outside"""
