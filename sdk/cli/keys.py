"""The key options every signing command shares: ``--passphrase-file`` and loading ``--key`` / ``--sign``.

An encrypted key is decrypted with the passphrase in ``--passphrase-file`` or, without it, in
``$EDGESHIP_KEY_PASSPHRASE``. The passphrase is read here and handed to ``sdk.signing``; it is never
printed (errors name the key file, not the passphrase). A passphrase given for a key that is not
encrypted is accepted with a one-line warning on stderr: the key still signs, but it is not protected
at rest, which whoever passed a passphrase should know.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from sdk.signing import PASSPHRASE_ENV, KeySigner, passphrase_from_env, read_passphrase_file

__all__ = ["add_passphrase_argument", "load_signers", "new_key_passphrase"]


def add_passphrase_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--passphrase-file FILE`` on a command that loads or writes private keys."""
    parser.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help=f"{what} (its bytes without a final newline; default: ${PASSPHRASE_ENV} if set)",
    )


def new_key_passphrase(passphrase_file: Path | None) -> bytes | None:
    """The passphrase `keys generate` encrypts with: the file's, else the environment's, else None."""
    return read_passphrase_file(passphrase_file) if passphrase_file else passphrase_from_env()


def load_signers(paths: Sequence[Path | str], passphrase_file: Path | None) -> list[KeySigner]:
    """Load key files; an encrypted one with ``passphrase_file``'s passphrase or the environment's.

    Raises:
        KeyFileError: a key or the passphrase file cannot be read, a key is encrypted and no passphrase
            was given, or the passphrase is wrong.
    """
    passphrase = read_passphrase_file(passphrase_file) if passphrase_file else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        signers = [KeySigner.from_file(p, passphrase) for p in paths]
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return signers
