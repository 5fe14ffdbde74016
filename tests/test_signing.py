"""Ed25519 keys and detached signatures (edgeglm.signing)."""

from __future__ import annotations

import stat

import pytest

from edgeglm.errors import ConfigError, SignatureError
from edgeglm.signing import (
    Signature,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    sign,
    verify_signature,
)


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert pub.name == "k.pub"
    assert key_id(load_private_key(priv).public_key()) == key_id(load_public_key(pub))
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path / "k")
    before = key_id(load_public_key(pub))
    generate_keypair(tmp_path / "k", overwrite=True)
    assert key_id(load_public_key(pub)) != before


def test_signatures_are_deterministic_and_verify(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    key = load_private_key(priv)
    s1, s2 = sign(b"manifest", key), sign(b"manifest", key)
    assert s1.to_bytes() == s2.to_bytes()
    verify_signature(b"manifest", Signature.from_bytes(s1.to_bytes()), load_public_key(pub))


def test_changed_data_or_other_key_is_refused_with_key_ids(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    _, other_pub = generate_keypair(tmp_path / "other")
    sig = sign(b"manifest", load_private_key(priv))
    with pytest.raises(SignatureError, match=r"does not match manifest.json"):
        verify_signature(b"manifesT", sig, load_public_key(pub))
    with pytest.raises(SignatureError, match=f"signed with key {sig.key_id}, but the trusted key is"):
        verify_signature(b"manifest", sig, load_public_key(other_pub))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b'{"algorithm": "rsa", "key_id": "x", "signature": ""}',
        b'{"algorithm": "ed25519"}',
        b'{"algorithm": "ed25519", "key_id": "x", "signature": "AAAA"}',
    ],
)
def test_malformed_signature_file_is_a_signature_error(raw):
    with pytest.raises(SignatureError, match="malformed"):
        Signature.from_bytes(raw)


def test_loading_the_wrong_file_says_which_one_to_pass(tmp_path):
    priv, pub = generate_keypair(tmp_path / "k")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_private_key(pub)
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(priv)
    with pytest.raises(ConfigError, match="edgeglm keygen"):
        load_private_key(tmp_path / "nope")
