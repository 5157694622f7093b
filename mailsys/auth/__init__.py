"""Authentication: the user store (``users``), password hashes (``passwords``) and the
twisted.cred checker over them (``checker``); the portal and realm every protocol logs in
through (``portal``), login-failure throttling per user and client address (``throttle``) and
SASL PLAIN (``sasl``).
"""
