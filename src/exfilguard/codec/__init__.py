"""exfilguard.codec"""
