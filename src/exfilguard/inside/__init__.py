"""exfilguard.inside"""
