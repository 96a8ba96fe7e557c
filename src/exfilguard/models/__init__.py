"""exfilguard.models"""
