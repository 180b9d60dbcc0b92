"""Which interface names the kernel accepts, and which each backend writes exactly.

A `-k` name ends up in `-i NAME` matches, and three things must agree on it:
the kernel (which decides what a device may be called), the tool that writes
the rule, and the iptables-save text istio-init reads back to find its own
rules on the next run. Checked in a namespace (tests/test_hostile_input.py):

- the kernel's dev_valid_name() works on bytes: 1-15 bytes (IFNAMSIZ 16 with
  the NUL), not "." or "..", no '/' or ':', and no byte its isspace() calls a
  space. Linux's ctype table counts byte 0xA0 (Latin-1's no-break space) as a
  space, so a UTF-8 name with an 0xA0 byte is refused: "à" (C3 A0) and the
  Cyrillic "Р" (D0 A0) in "ДОБРО" are not valid names, while "é" (C3 A9) is.
- python-iptables (the libiptc backend) counts characters, not bytes, when it
  builds the interface mask: a non-ASCII name is stored cut short and becomes
  a wildcard (`-k ДОБРО` matched `ДОБ+`), or leaves half a UTF-8 sequence that
  iptables-save then cannot print as text. Only ASCII names are exact there.
- iptables-legacy-restore and iptables-nft-restore store the UTF-8 bytes as
  given and print them back unchanged.
- A name that starts with '-' (`-k -j`) is written by every backend, but in
  the saved text `-i -j -j ISTIO_REDIRECT` reads as options, so istio-init
  could never recognise (or remove) the rule again.
- A name with a character Python calls a space or unprintable (U+2003, U+0085,
  U+200B), which the kernel takes, is written exactly, but the rules read back
  from iptables-save text are split on Unicode whitespace, so the second run
  did not recognise `-i a\u2003b -j RETURN` as its own and left it behind.
- A trailing '+' is iptables' documented wildcard (`-k vnet+` matches every
  vnet device), which Istio passes through as well; it is kept, on purpose.
  The kernel stores a wildcard as a name and a mask over the bytes before the
  '+', so `+` alone is a mask of no bytes: every backend stores "any
  interface", iptables-save prints no `-i` at all, and the rule (`-j RETURN`
  in PREROUTING) would return every packet. It is refused. Any other name
  ending in '+' (`++`, `a+`) keeps at least one byte and is stored and printed
  back exactly; a '+' or '*' inside a name is a plain character to iptables,
  and the nftables writer escapes a trailing '*' so nft reads it as one too
  (nft counts that escape in the 15 bytes, so such a name may hold 14).
"""

from __future__ import annotations

IFNAMSIZ = 16
# Bytes the kernel's isspace() (lib/ctype.c) calls spaces: \t \n \v \f \r, ' ' and 0xA0.
_KERNEL_SPACES = frozenset(b"\t\n\v\f\r \xa0")
LIBIPTC = "libiptc"
NATIVE_NFTABLES = "native-nftables"  # not an --iptables-backend: what writes the names under --native-nftables


def kernel_refusal(name: str) -> str | None:
    """Why the kernel would refuse `name` as a device name, or None."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if not raw or len(raw) >= IFNAMSIZ:
        return f"{len(raw)} bytes; the kernel allows 1-{IFNAMSIZ - 1}"
    if name in (".", "..") or any(b in b"/:" or b in _KERNEL_SPACES for b in raw):
        return "not an interface name the kernel accepts"
    return None


def common_refusal(name: str) -> str | None:
    """Why no backend can carry `name` so that istio-init finds the rule again, or None."""
    if name.startswith("-"):
        return "a name starting with '-' reads as an iptables option in iptables-save text"
    if name == "+":
        return ("'+' alone is a wildcard of no characters: the kernel stores it as any interface "
                "(no -i match at all); give a prefix before '+', such as vnet+")
    odd = next((c for c in name if c.isspace() or not c.isprintable()), None)
    if odd is not None:
        return f"character {odd!r} splits or hides the name where istio-init reads its rules back"
    return None


def backend_refusal(name: str, backend: str) -> str | None:
    """Why `backend` (or NATIVE_NFTABLES) cannot write `name` exactly, or None (auto never picks libiptc)."""
    if backend == LIBIPTC and not name.isascii():
        return ("--iptables-backend libiptc (python-iptables) cannot write a non-ASCII name "
                "exactly (it would cut it into a wildcard); use --iptables-backend legacy or nft")
    if backend == NATIVE_NFTABLES and name.endswith("*") and len(name.encode("utf-8")) >= IFNAMSIZ - 1:
        return ("with --native-nftables a name ending in '*' may have at most 14 bytes: nft counts the "
                "escape that keeps the '*' from being a wildcard")
    return None

