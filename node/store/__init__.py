"""Local storage: the key file, SQLite (via sqlite-utils), ciphertext blobs, the audit log.

Never imports the transport. Everything that could identify a patient is
stored encrypted: record bodies as they arrived (ciphertext), list metadata
under the local storage key, and a keyed blind index for search.
"""
