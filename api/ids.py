"""Public ids: a type prefix plus random base62, like Anthropic's `msg_...` and `req_...`."""

import secrets
import string

BASE62_ALPHABET = string.digits + string.ascii_uppercase + string.ascii_lowercase
ID_LENGTH = 24  # 24 base62 chars ~ 143 bits of randomness


def base62(length: int = ID_LENGTH) -> str:
    """`length` random base62 characters from a CSPRNG."""
    return "".join(secrets.choice(BASE62_ALPHABET) for _ in range(length))


def new_request_id() -> str:
    """`req_` id: the request row's primary key and the `request-id` header."""
    return f"req_{base62()}"


def new_message_id() -> str:
    """`msg_` id of a generated Message."""
    return f"msg_{base62()}"


def new_account_id() -> str:
    """`acct_` id of an account."""
    return f"acct_{base62()}"


def new_key_id() -> str:
    """`key_` id of an API key (the public handle, not the secret)."""
    return f"key_{base62()}"
