"""exfilguard.verify"""
