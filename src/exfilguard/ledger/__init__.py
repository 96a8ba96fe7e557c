"""exfilguard.ledger"""
