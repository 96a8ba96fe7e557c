"""exfilguard.plan"""
