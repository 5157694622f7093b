"""Authentication: the user store (``users``), password hashes (``passwords``) and the
twisted.cred checker over them (``checker``). Realm and login throttling come with AUTH.
"""
