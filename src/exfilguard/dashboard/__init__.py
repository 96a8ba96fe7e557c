"""exfilguard.dashboard"""
