"""Money as integers: currencies with their minor-unit exponent, and exact
parsing of decimal strings into minor units (and back) without floats.

Every amount the accounting plugins store or split is an integer count of a
currency's minor unit (cents for EUR, yen for JPY), so all nodes agree exactly.
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import ValidationError

# ISO 4217 minor units of the currencies people most often use; any other
# currency or unit code can be used by stating its exponent explicitly.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AUD": 2,
    "BHD": 3,
    "BRL": 2,
    "CAD": 2,
    "CHF": 2,
    "CLP": 0,
    "CNY": 2,
    "CZK": 2,
    "DKK": 2,
    "EUR": 2,
    "GBP": 2,
    "HKD": 2,
    "HUF": 2,
    "IDR": 2,
    "INR": 2,
    "IQD": 3,
    "ISK": 0,
    "JOD": 3,
    "JPY": 0,
    "KRW": 0,
    "KWD": 3,
    "LYD": 3,
    "MXN": 2,
    "NOK": 2,
    "NZD": 2,
    "OMR": 3,
    "PLN": 2,
    "RON": 2,
    "SEK": 2,
    "SGD": 2,
    "TND": 3,
    "UGX": 0,
    "USD": 2,
    "VND": 0,
    "XAF": 0,
    "XOF": 0,
    "ZAR": 2,
}
MAX_EXPONENT = 8
# A trillion major units is beyond any plausible pop-up network's revenue; a
# bigger figure is a typo or an attack on someone's arithmetic.
MAX_MAJOR_UNITS = 10**12
MAX_AMOUNT_TEXT = 40
_CODE_RE = re.compile(r"^[A-Z][A-Z0-9]{2,7}$")
_DECIMAL_RE = re.compile(r"^(0|[1-9][0-9]*)(\.([0-9]+))?$")


def currency_exponent(code: str, exponent: int | None = None) -> int:
    """The minor-unit exponent of `code`; an unknown code needs `exponent` given."""
    if not isinstance(code, str) or not _CODE_RE.match(code):
        raise ValidationError(
            f"'{code}' is not a currency code: use 3 to 8 capital letters or digits, like EUR."
        )
    known = CURRENCY_EXPONENTS.get(code)
    if exponent is not None:
        if (
            not isinstance(exponent, int)
            or isinstance(exponent, bool)
            or not 0 <= exponent <= MAX_EXPONENT
        ):
            raise ValidationError(
                f"A currency exponent must be an integer from 0 to {MAX_EXPONENT}."
            )
        if known is not None and exponent != known:
            raise ValidationError(f"{code} has {known} decimals, not {exponent}.")
        return exponent
    if known is None:
        raise ValidationError(f"The currency {code} is not known; give its number of decimals.")
    return known


def parse_decimal(text: str, what: str = "An amount") -> Fraction:
    """An exact non-negative rational from a decimal string like '12.50'."""
    if not isinstance(text, str) or len(text) > MAX_AMOUNT_TEXT:
        raise ValidationError(
            f"{what} must be a decimal string of at most {MAX_AMOUNT_TEXT} characters."
        )
    t = text
    if t.startswith("-"):
        raise ValidationError(f"{what} must not be negative ('{text}').")
    m = _DECIMAL_RE.match(t)
    if not m:
        raise ValidationError(f"{what} must be a plain decimal like '1200.00', not '{text}'.")
    frac = m.group(3) or ""
    return Fraction(int(m.group(1) + frac), 10 ** len(frac))


def parse_amount(text: str, code: str, exponent: int) -> int:
    """Minor units of a positive decimal amount; refuse more decimals than `code` has."""
    value = parse_decimal(text)
    decimals = len(text.partition(".")[2])
    if decimals > exponent:
        allowed = "no decimals" if exponent == 0 else f"at most {exponent} decimals"
        raise ValidationError(
            f"The amount {text} has {decimals} decimals but {code} allows {allowed}."
        )
    if value <= 0:
        raise ValidationError(f"The amount must be greater than zero, not {text}.")
    if value > MAX_MAJOR_UNITS:
        raise ValidationError(
            f"The amount {text} {code} is over the plausible limit of {MAX_MAJOR_UNITS}."
        )
    minor = value * 10**exponent
    assert minor.denominator == 1
    return int(minor)


def to_minor_floor(value: Fraction, exponent: int) -> int:
    """Whole minor units in `value` major units, rounded down."""
    scaled = value * (10**exponent)
    return int(scaled.numerator // scaled.denominator)


def format_minor(minor: int, exponent: int) -> str:
    """'1200.00' for 120000 minor units at exponent 2; exact, no floats."""
    sign = "-" if minor < 0 else ""
    digits = str(abs(minor)).rjust(exponent + 1, "0")
    if exponent == 0:
        return sign + digits
    return f"{sign}{digits[:-exponent]}.{digits[-exponent:]}"


def format_fraction(value: Fraction, places: int = 6) -> str:
    """A rational as a decimal string, truncated toward zero to `places` places.

    Used only in explanations; the arithmetic itself never rounds this way.
    """
    sign = "-" if value < 0 else ""
    v = abs(value)
    scaled = v.numerator * 10**places // v.denominator
    text = format_minor(scaled, places)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    exact = Fraction(scaled, 10**places) == v
    return sign + text + ("" if exact else "…")
