"""The pure core: errors, wire format, crypto, identity, envelope, consent tokens, patient cards.

No I/O here: functions over bytes and a given `now`.
"""
