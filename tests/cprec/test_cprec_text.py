"""The behaviour-text template shared by training and serving."""

from __future__ import annotations

import random
import unicodedata

import pytest
from pydantic import ValidationError

from cprec.text import DEFAULT_TEMPLATE, Behaviour, Template, normalise_title


def test_render_item_makes_domain_visible() -> None:
    assert DEFAULT_TEMPLATE.render_item("Books", "Dune") == "Books: Dune"


def test_render_history_joins_in_time_order_with_prefix() -> None:
    t = Template(separator=" | ", history_prefix="History: ")
    hist = [Behaviour("Books", "Dune"), Behaviour("Movies", "Alien")]
    assert t.render_history(hist) == "History: Books: Dune | Movies: Alien"


def test_render_history_keeps_last_n_oldest_first() -> None:
    hist = [Behaviour("D", f"t{i}") for i in range(30)]
    text = Template(max_items=3).render_history(hist)
    assert text == "D: t27; D: t28; D: t29"
    # Default keeps 20, and an explicit override wins over the template's own limit.
    assert DEFAULT_TEMPLATE.render_history(hist).count("D: ") == 20
    assert DEFAULT_TEMPLATE.render_history(hist).startswith("D: t10;")
    assert DEFAULT_TEMPLATE.render_history(hist, max_items=1) == "D: t29"


def test_render_history_empty_and_zero() -> None:
    assert DEFAULT_TEMPLATE.render_history([]) == ""
    assert DEFAULT_TEMPLATE.render_history([Behaviour("D", "x")], max_items=0) == ""


def test_render_sequence_is_not_truncated() -> None:
    hist = [Behaviour("D", f"t{i}") for i in range(30)]
    assert Template(max_items=2).render_sequence(hist).count("D: ") == 30


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Dark   Roast\tCoffee \n", "Dark Roast Coffee"),
        ("Caf\u0065\u0301 Latte", "Caf\u00e9 Latte"),  # NFD -> NFC
        ("Tab\x00Null\x07Bell", "Tab Null Bell"),  # control characters become spaces
        ("Zero\u200bWidth", "Zero Width"),  # format characters too
        ("", ""),
    ],
)
def test_normalise_title(raw: str, expected: str) -> None:
    assert normalise_title(raw) == expected


def test_equal_titles_render_equal_text() -> None:
    a = DEFAULT_TEMPLATE.render_item("Groceries", "Caf\u0065\u0301  Beans")
    b = DEFAULT_TEMPLATE.render_item("Groceries", "Caf\u00e9 Beans ")
    assert a == b == "Groceries: Caf\u00e9 Beans"


def test_fingerprint_stable_and_sensitive() -> None:
    assert Template().fingerprint() == Template().fingerprint()
    assert len(Template().fingerprint()) == 12
    assert Template(max_items=5).fingerprint() != Template().fingerprint()
    assert Template(separator=" | ").fingerprint() != Template().fingerprint()


def test_template_round_trips_through_a_manifest_dump() -> None:
    t = Template(separator=" / ", history_prefix="User: ", max_items=7)
    assert Template.model_validate(t.model_dump()) == t


def test_max_items_bounds() -> None:
    with pytest.raises(ValidationError):
        Template(max_items=0)


def _normalise_reference(title: str) -> str:
    """The definition, one character at a time (the fast path must agree with it)."""
    title = unicodedata.normalize("NFC", title)
    title = "".join(ch if unicodedata.category(ch)[0] != "C" else " " for ch in title)
    return " ".join(title.split())


def test_normalise_title_fast_path_matches_the_definition() -> None:
    pool = list("abc XYZ09-'&é") + [
        "e\u0301",
        "\u00a0",
        "\u2028",
        "\u200b",
        "\u00ad",
        "\ufeff",
        "\x00",
        "\x1f",
        "\x7f",
        "\x85",
        "\t",
        "\n",
        "\ue000",
        "\U0001f600",
        "\u3000",
        "\u0378",
    ]
    rng = random.Random(5)
    for _ in range(2000):
        t = "".join(rng.choice(pool) for _ in range(rng.randint(0, 12)))
        assert normalise_title(t) == _normalise_reference(t), repr(t)
