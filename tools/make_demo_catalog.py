#!/usr/bin/env python3
"""Generate the synthetic multi-domain demo catalogue for the cprec service.

Every brand, game title and film title below is invented here from hand-made
vocabulary lists; no third-party data is read or copied. The script uses only
the standard library and a fixed ``random.Random(SEED)``, so re-running it
produces a byte-identical ``service/data/demo_catalog.jsonl`` (the catalogue the
service ships). A development tool: nothing at run time imports it.

Usage:
    python3 tools/make_demo_catalog.py [--out PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
OUT_PATH = Path(__file__).resolve().parent.parent / "service" / "data" / "demo_catalog.jsonl"

# Zipf-like popularity: popularity(rank) ~= ZIPF_SCALE / rank ** ZIPF_EXPONENT.
ZIPF_SCALE = 50_000
ZIPF_EXPONENT = 1.07


def pick(rng: random.Random, seq):
    return seq[rng.randrange(len(seq))]


def pack(rng: random.Random, options=(1, 1, 2, 3, 4, 6)) -> str:
    n = pick(rng, options)
    return "" if n == 1 else f" (Pack of {n})"


# ---------------------------------------------------------------------------
# Groceries
# ---------------------------------------------------------------------------
GROC_BRANDS = [
    "Harvest Lane",
    "Golden Acre",
    "Maple Hollow",
    "Brookside Pantry",
    "Sunfield Farms",
    "Wild Meadow",
    "Old Mill Road",
    "Pinecrest Provisions",
    "Little Orchard",
    "Stonebridge Kitchen",
    "Riverbend Mercantile",
    "Cedar Grove",
    "Hearth & Field",
]
COFFEE_ORIGINS = [
    "Colombian Supremo",
    "Ethiopian Yirgacheffe",
    "Sumatra Mandheling",
    "Guatemalan Antigua",
    "Costa Rica Tarrazu",
    "Kenya AA",
    "Brazilian Santos",
    "Breakfast Blend",
    "House Blend",
    "Espresso Blend",
    "French Roast",
]
COFFEE_ROASTS = ["Light Roast", "Medium Roast", "Medium-Dark Roast", "Dark Roast"]
COFFEE_FORMS = [
    ("Whole Bean Coffee", ["12 Ounce Bag", "2 Pound Bag", "32 Ounce Bag"]),
    ("Ground Coffee", ["12 Ounce Bag", "10 Ounce Can", "24 Ounce Canister"]),
    ("Single Serve Coffee Pods", ["24 Count", "48 Count", "72 Count"]),
    ("Cold Brew Coarse Ground Coffee", ["16 Ounce Bag", "2 Pound Bag"]),
]
TEA_TYPES = [
    "Earl Grey Black Tea",
    "English Breakfast Black Tea",
    "Irish Breakfast Black Tea",
    "Organic Green Tea",
    "Jasmine Green Tea",
    "Sencha Green Tea",
    "Chamomile Herbal Tea",
    "Peppermint Herbal Tea",
    "Ginger Lemon Herbal Tea",
    "Rooibos Vanilla Herbal Tea",
    "Hibiscus Berry Herbal Tea",
    "Masala Chai Black Tea",
    "Oolong Tea",
    "White Peony Tea",
    "Decaf Earl Grey Tea",
]
TEA_FORMS = [
    "20 Tea Bags",
    "40 Tea Bags",
    "100 Tea Bags",
    "Loose Leaf, 4 Ounce Tin",
    "Loose Leaf, 8 Ounce Pouch",
]
MATCHA = ["Ceremonial Grade Matcha Green Tea Powder", "Culinary Grade Matcha Green Tea Powder"]
CHIP_FLAVOURS = [
    "Sea Salt",
    "Sea Salt & Vinegar",
    "Jalapeno",
    "Barbecue",
    "Sour Cream & Onion",
    "Cracked Pepper",
    "Honey Dijon",
    "Dill Pickle",
    "Smoked Cheddar",
]
CHIP_TYPES = [
    "Kettle Cooked Potato Chips",
    "Tortilla Chips",
    "Sweet Potato Chips",
    "Baked Pita Chips",
    "Veggie Straws",
]
NUTS = [
    "Roasted & Salted Almonds",
    "Raw Unsalted Cashews",
    "Honey Roasted Peanuts",
    "Lightly Salted Mixed Nuts",
    "Shelled Pistachios",
    "Trail Mix with Dark Chocolate",
    "Raw Walnut Halves",
    "Dry Roasted Macadamia Nuts",
]
BARS = ["Chewy Granola Bars", "Protein Bars", "Fruit & Nut Bars", "Oat Bars"]
BAR_FLAVOURS = [
    "Peanut Butter Chocolate Chip",
    "Oats & Honey",
    "Dark Chocolate Almond",
    "Blueberry Vanilla",
    "Cranberry Almond",
    "Salted Caramel",
]
CRACKERS = [
    "Whole Grain Crackers",
    "Sea Salt Rice Crackers",
    "Rosemary Flatbread Crackers",
    "Cheddar Cheese Crackers",
    "Multigrain Seed Crackers",
]
PASTA_SHAPES = [
    "Spaghetti",
    "Penne Rigate",
    "Fusilli",
    "Rigatoni",
    "Farfalle",
    "Linguine",
    "Orecchiette",
    "Elbow Macaroni",
    "Fettuccine",
    "Rotini",
    "Angel Hair",
]
PASTA_TYPES = [
    "Durum Wheat Semolina",
    "Whole Wheat",
    "Gluten Free Brown Rice",
    "Chickpea Protein",
    "Red Lentil",
    "Bronze Cut Italian",
]
SAUCES = [
    "Tomato Basil Marinara Pasta Sauce",
    "Roasted Garlic Pasta Sauce",
    "Spicy Arrabbiata Pasta Sauce",
    "Classic Basil Pesto",
    "Creamy Alfredo Sauce",
    "Vodka Tomato Cream Sauce",
    "Puttanesca Pasta Sauce",
]
SPICES = [
    "Ground Cumin",
    "Smoked Paprika",
    "Ceylon Cinnamon",
    "Ground Turmeric",
    "Whole Black Peppercorns",
    "Italian Seasoning Blend",
    "Garlic Powder",
    "Crushed Red Pepper Flakes",
    "Ground Ginger",
    "Chili Powder",
    "Dried Oregano",
    "Onion Powder",
    "Ground Coriander",
    "Cajun Seasoning",
    "Taco Seasoning Mix",
    "Curry Powder",
    "Everything Bagel Seasoning",
]
SPICE_SIZES = ["2 Ounce Jar", "3.5 Ounce Jar", "6 Ounce Shaker", "16 Ounce Bulk Bag"]
BREAKFAST = [
    "Old Fashioned Rolled Oats",
    "Steel Cut Oats",
    "Honey Almond Granola",
    "Maple Pecan Granola",
    "Cinnamon Crunch Cereal",
    "Bran Flakes Cereal",
    "Muesli with Dried Fruit",
    "Buttermilk Pancake & Waffle Mix",
]
PANTRY = [
    ("Extra Virgin Olive Oil, Cold Pressed", ["500 ml Bottle", "1 Liter Bottle", "3 Liter Tin"]),
    ("Aged Balsamic Vinegar of Modena", ["8.5 Ounce Bottle", "16.9 Ounce Bottle"]),
    ("Raw Wildflower Honey", ["12 Ounce Squeeze Bottle", "32 Ounce Jar"]),
    ("Pure Maple Syrup, Grade A Dark", ["12 Ounce Bottle", "32 Ounce Jug"]),
    ("Creamy Peanut Butter", ["16 Ounce Jar", "28 Ounce Jar"]),
    ("Strawberry Preserves", ["13 Ounce Jar", "18 Ounce Jar"]),
    ("Long Grain Jasmine Rice", ["2 Pound Bag", "5 Pound Bag"]),
    ("Basmati Rice", ["2 Pound Bag", "10 Pound Bag"]),
    ("Tri-Color Quinoa", ["16 Ounce Bag", "4 Pound Bag"]),
    ("All Purpose Unbleached Flour", ["5 Pound Bag", "10 Pound Bag"]),
    ("Organic Cane Sugar", ["4 Pound Bag", "10 Pound Bag"]),
]
CHOCOLATE = [
    ("72% Cacao Dark Chocolate Bar, Sea Salt", ["3 Ounce Bar", "3.5 Ounce Bar"]),
    ("85% Cacao Extra Dark Chocolate Bar", ["3 Ounce Bar", "3.5 Ounce Bar"]),
    ("Milk Chocolate Bar with Toasted Almonds", ["3 Ounce Bar", "3.5 Ounce Bar"]),
    ("Dark Chocolate Bar with Raspberry", ["3 Ounce Bar", "3.5 Ounce Bar"]),
    ("Dark Chocolate Covered Espresso Beans", ["8 Ounce Bag", "16 Ounce Bag"]),
    ("Milk Chocolate Peanut Butter Cups", ["8 Ounce Bag", "12 Ounce Bag"]),
    ("Sea Salt Caramel Chocolate Squares", ["7.5 Ounce Bag", "12 Ounce Bag"]),
]
DRINKS = [
    "Sparkling Water, Lime",
    "Sparkling Water, Grapefruit",
    "Coconut Water",
    "Cold Pressed Apple Juice",
    "Lemonade, Not From Concentrate",
    "Unsweetened Almond Milk",
    "Oat Milk, Barista Edition",
    "Kombucha, Ginger",
]


def organic(rng: random.Random) -> str:
    return "Organic " if rng.random() < 0.35 else ""


def g_coffee(rng):
    brand = pick(rng, GROC_BRANDS)
    form, sizes = pick(rng, COFFEE_FORMS)
    return (
        f"{brand} {organic(rng)}{pick(rng, COFFEE_ORIGINS)} {pick(rng, COFFEE_ROASTS)} "
        f"{form}, {pick(rng, sizes)}{pack(rng, (1, 1, 2, 3))}"
    )


def g_tea(rng):
    brand = pick(rng, GROC_BRANDS)
    if rng.random() < 0.15:
        return (
            f"{brand} {organic(rng)}{pick(rng, MATCHA)}, {pick(rng, ['1 Ounce', '3.5 Ounce'])} Tin"
        )
    return f"{brand} {organic(rng)}{pick(rng, TEA_TYPES)}, {pick(rng, TEA_FORMS)}{pack(rng)}"


def g_snack(rng):
    brand = pick(rng, GROC_BRANDS)
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"{brand} {pick(rng, CHIP_TYPES)}, {pick(rng, CHIP_FLAVOURS)}, "
            f"{pick(rng, ['5 Ounce', '8 Ounce', '1 Ounce Snack'])} Bag{pack(rng, (1, 6, 12, 24))}"
        )
    if kind == 1:
        return (
            f"{brand} {pick(rng, NUTS)}, "
            f"{pick(rng, ['16 Ounce Bag', '24 Ounce Resealable Bag', '40 Ounce Canister'])}"
            f"{pack(rng, (1, 1, 2))}"
        )
    if kind == 2:
        return (
            f"{brand} {pick(rng, BAR_FLAVOURS)} {pick(rng, BARS)}, "
            f"{pick(rng, ['1.4 Ounce', '1.8 Ounce'])}, {pick(rng, ['12', '18', '24'])} Count"
        )
    return (
        f"{brand} {pick(rng, CRACKERS)}, "
        f"{pick(rng, ['4.5 Ounce', '8 Ounce', '10 Ounce'])} Box{pack(rng)}"
    )


def g_pasta(rng):
    brand = pick(rng, GROC_BRANDS)
    if rng.random() < 0.35:
        return (
            f"{brand} {organic(rng)}{pick(rng, SAUCES)}, "
            f"{pick(rng, ['24 Ounce Jar', '6.3 Ounce Jar', '15 Ounce Jar'])}{pack(rng)}"
        )
    return (
        f"{brand} {organic(rng)}{pick(rng, PASTA_TYPES)} {pick(rng, PASTA_SHAPES)} Pasta, "
        f"{pick(rng, ['12 Ounce', '16 Ounce', '1 Pound'])} Box{pack(rng, (1, 4, 6, 8, 12))}"
    )


def g_spice(rng):
    return (
        f"{pick(rng, GROC_BRANDS)} {organic(rng)}{pick(rng, SPICES)}, "
        f"{pick(rng, SPICE_SIZES)}{pack(rng, (1, 1, 2, 3))}"
    )


def g_breakfast(rng):
    return (
        f"{pick(rng, GROC_BRANDS)} {organic(rng)}{pick(rng, BREAKFAST)}, "
        f"{pick(rng, ['12 Ounce Bag', '18 Ounce Canister', '32 Ounce Bag', '11 Ounce Box'])}"
        f"{pack(rng)}"
    )


def g_pantry(rng):
    item, sizes = pick(rng, PANTRY)
    return (
        f"{pick(rng, GROC_BRANDS)} {organic(rng)}{item}, "
        f"{pick(rng, sizes)}{pack(rng, (1, 1, 2, 3))}"
    )


def g_chocolate(rng):
    item, sizes = pick(rng, CHOCOLATE)
    return (
        f"{pick(rng, GROC_BRANDS)} {organic(rng)}{item}, "
        f"{pick(rng, sizes)}{pack(rng, (1, 2, 6, 10, 12))}"
    )


def g_drink(rng):
    return (
        f"{pick(rng, GROC_BRANDS)} {organic(rng)}{pick(rng, DRINKS)}, "
        f"{pick(rng, ['12 Fl Oz Cans', '16.9 Fl Oz Bottles', '32 Fl Oz Cartons'])}"
        f" (Pack of {pick(rng, [4, 6, 8, 12, 24])})"
    )


GROCERIES = [
    (g_coffee, 22),
    (g_tea, 20),
    (g_snack, 18),
    (g_pasta, 16),
    (g_spice, 16),
    (g_breakfast, 10),
    (g_pantry, 14),
    (g_chocolate, 10),
    (g_drink, 10),
]

# ---------------------------------------------------------------------------
# Kitchen
# ---------------------------------------------------------------------------
KIT_BRANDS = [
    "NorthPeak",
    "Cookwise",
    "Ironleaf",
    "Kitchora",
    "Hearthline",
    "Brightforge",
    "Sable & Stone",
    "Copperlane",
    "Tidewell Home",
    "Oakmere",
    "Culinova",
    "Everstead",
]
COLOURS = [
    "Black",
    "Matte Black",
    "Stainless Steel",
    "Sage Green",
    "Cream",
    "Charcoal Gray",
    "Navy Blue",
    "Red",
    "White",
    "Slate Blue",
]


def k_pan(rng):
    b = pick(rng, KIT_BRANDS)
    size = pick(rng, ["8", "10", "12"])
    coat = pick(
        rng,
        [
            "Nonstick Ceramic",
            "Hard Anodized Nonstick",
            "Tri-Ply Stainless Steel",
            "Pre-Seasoned Cast Iron",
            "Carbon Steel",
            "Granite Coated Nonstick",
        ],
    )
    kind = pick(rng, ["Frying Pan", "Skillet", "Saute Pan", "Wok", "Grill Pan", "Crepe Pan"])
    feat = pick(
        rng, ["Stay-Cool Handle", "Helper Handle", "Glass Lid", "Riveted Handle", "Pour Spouts"]
    )
    if "Cast Iron" in coat or "Carbon Steel" in coat:  # not dishwasher safe / not coated
        tail = pick(rng, ["Oven Safe to 500F", "Induction Compatible", "Hand Wash Only"])
    else:
        tail = pick(
            rng, ["Dishwasher Safe", "Oven Safe to 500F", "Induction Compatible", "PFOA Free"]
        )
    return f"{b} {size}-Inch {coat} {kind} with {feat}, {tail}"


def k_cookware_set(rng):
    b = pick(rng, KIT_BRANDS)
    n = pick(rng, ["5-Quart", "6-Quart", "7-Quart"])
    if rng.random() < 0.5:
        return f"{b} {n} Enameled Cast Iron Dutch Oven with Lid, {pick(rng, COLOURS)}, Oven Safe"
    return (
        f"{b} {pick(rng, ['8', '10', '12', '14'])}-Piece "
        f"{pick(rng, ['Nonstick', 'Stainless Steel', 'Ceramic Nonstick', 'Hard Anodized'])} "
        f"Pots and Pans Cookware Set, {pick(rng, COLOURS)}"
    )


def k_knife(rng):
    b = pick(rng, KIT_BRANDS)
    steel = pick(
        rng,
        [
            "High Carbon German Stainless Steel",
            "Japanese VG10 Damascus Steel",
            "Forged Stainless Steel",
            "Ceramic Blade",
        ],
    )
    handle = pick(
        rng,
        [
            "Pakkawood Handle",
            "Ergonomic Handle",
            "Walnut Handle",
            "Full Tang Triple Riveted Handle",
        ],
    )
    if rng.random() < 0.3:
        return (
            f"{b} {pick(rng, ['6', '12', '15', '17'])}-Piece Kitchen Knife Block Set with "
            f"Built-In Sharpener, {steel}, {pick(rng, COLOURS)}"
        )
    size, kind = pick(
        rng,
        [
            ("8", "Chef's Knife"),
            ("7", "Santoku Knife"),
            ("3.5", "Paring Knife"),
            ("10", "Bread Knife"),
            ("6", "Boning Knife"),
            ("5", "Utility Knife"),
            ("7", "Nakiri Vegetable Knife"),
        ],
    )
    return f"{b} {size}-Inch {kind}, {steel}, {handle}"


def k_blender(rng):
    b = pick(rng, KIT_BRANDS)
    kind = rng.randrange(3)
    if kind == 0:
        return (
            f"{b} {pick(rng, ['700', '1000', '1200', '1500'])}-Watt Countertop Blender with "
            f"{pick(rng, ['48', '64', '72'])}-Ounce "
            f"{pick(rng, ['BPA-Free', 'Glass', 'Shatterproof'])} Jar, "
            f"{pick(rng, ['5', '8', '10'])} Speeds, {pick(rng, COLOURS)}"
        )
    if kind == 1:
        return (
            f"{b} Personal Smoothie Blender with {pick(rng, ['2', '3', '4'])} "
            f"{pick(rng, ['20', '24'])}-Ounce To-Go Cups, {pick(rng, ['300', '600', '900'])} Watts"
        )
    return (
        f"{b} {pick(rng, ['2-Speed', 'Variable Speed', 'Cordless Rechargeable'])} "
        f"Immersion Hand Blender with Whisk Attachment, {pick(rng, COLOURS)}"
    )


def k_appliance(rng):
    b = pick(rng, KIT_BRANDS)
    c = pick(rng, COLOURS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['1.7', '1.5', '1.0'])} Liter Electric Kettle, "
            f"{pick(rng, ['Glass', 'Stainless Steel', 'Gooseneck Pour-Over'])}, Auto Shut-Off, {c}",
            f"{b} {pick(rng, ['5', '12', '14'])}-Cup Programmable Drip Coffee Maker with "
            f"{pick(rng, ['Thermal Carafe', 'Glass Carafe'])}, {c}",
            f"{b} {pick(rng, ['34', '27', '12'])}-Ounce French Press Coffee Maker, "
            f"{pick(rng, ['Borosilicate Glass', 'Double Wall Stainless Steel'])}",
            f"{b} Burr Coffee Grinder with {pick(rng, ['16', '18', '31'])} Grind Settings, {c}",
            f"{b} {pick(rng, ['2', '4'])}-Slice Wide Slot Toaster with Bagel Setting, {c}",
            f"{b} {pick(rng, ['5', '6', '8'])}-Quart Air Fryer with Digital Touchscreen, {c}",
            f"{b} {pick(rng, ['4.5', '5', '6'])}-Quart Tilt-Head Stand Mixer, "
            f"{pick(rng, ['10', '12'])} Speeds, {c}",
            f"{b} {pick(rng, ['6', '8'])}-Quart Multi-Use Pressure Cooker and Slow Cooker, "
            "Stainless Steel",
        ],
    )


def k_board(rng):
    b = pick(rng, KIT_BRANDS)
    mat = pick(
        rng,
        [
            "Acacia Wood",
            "End Grain Walnut",
            "Bamboo",
            "Teak Wood",
            "Non-Slip Plastic",
            "Maple Wood",
        ],
    )
    return (
        f"{b} {mat} Cutting Board{pick(rng, [' Set of 3', '', ' with Juice Groove'])}, "
        f"{pick(rng, ['Large 18 x 12 Inch', 'Medium 15 x 10 Inch', 'Reversible'])}"
    )


def k_storage(rng):
    b = pick(rng, KIT_BRANDS)
    return (
        f"{b} {pick(rng, ['10', '14', '18', '24'])}-Piece "
        f"{pick(rng, ['Glass', 'BPA-Free Plastic', 'Airtight Pantry', 'Stainless Steel'])} "
        f"Food Storage Containers with "
        f"{pick(rng, ['Snap Locking Lids', 'Bamboo Lids', 'Leakproof Lids', 'Labels and Marker'])}"
        ", "
        f"{pick(rng, ['Microwave Safe', 'Stackable', 'Freezer Safe', 'Dishwasher Safe'])}"
    )


def k_tools(rng):
    b = pick(rng, KIT_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['Stainless Steel', 'Plastic', 'Magnetic'])} "
            "Measuring Cups and Spoons Set, "
            f"{pick(rng, ['8', '10', '12'])} Piece",
            f"{b} {pick(rng, ['12', '15', '25'])}-Piece "
            f"{pick(rng, ['Silicone', 'Wooden', 'Nylon'])} Cooking Utensil Set with Holder, "
            f"{pick(rng, COLOURS)}",
            f"{b} {pick(rng, ['Stainless Steel', 'Glass'])} Mixing Bowls with Lids, Set of "
            f"{pick(rng, ['3', '5', '6'])}, Nesting",
            f"{b} {pick(rng, ['Y-Shaped', 'Swivel', 'Julienne'])} Vegetable Peeler, "
            "Stainless Steel Blade",
            f"{b} {pick(rng, ['Manual', 'Smooth Edge', 'Electric'])} Can Opener, "
            f"{pick(rng, COLOURS)}",
            f"{b} Digital Kitchen Scale, {pick(rng, ['11 lb', '22 lb'])} Capacity, Tempered Glass",
            f"{b} Instant Read Meat Thermometer, "
            f"{pick(rng, ['Waterproof', 'Backlit', 'Foldable Probe'])}",
            f"{b} Cotton Kitchen Dish Towels, {pick(rng, ['16 x 28 Inch', '18 x 28 Inch'])}, "
            f"{pick(rng, COLOURS)}, Set of {pick(rng, ['4', '6', '8'])}",
        ],
    )


def k_bakeware(rng):
    b = pick(rng, KIT_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['Half Sheet', 'Quarter Sheet', 'Jelly Roll'])} Baking Pan, "
            f"{pick(rng, ['Aluminum', 'Nonstick Carbon Steel'])}, Set of {pick(rng, ['2', '3'])}",
            f"{b} {pick(rng, ['12-Cup', '24-Cup'])} Nonstick Muffin Pan, {pick(rng, COLOURS)}",
            f"{b} {pick(rng, ['9-Inch', '10-Inch'])} Springform Cake Pan, Leakproof, Nonstick",
            f"{b} {pick(rng, ['9 x 13 Inch', '8 x 8 Inch'])} Glass Baking Dish with Lid",
            f"{b} Silicone Baking Mats, {pick(rng, ['Set of 2', 'Set of 3'])}, Reusable, Non-Stick",
            f"{b} {pick(rng, ['9 x 5 Inch', '8.5 x 4.5 Inch'])} Nonstick Loaf Pan, "
            f"{pick(rng, ['Set of 2', 'Set of 4'])}",
            f"{b} {pick(rng, ['10-Inch', '11-Inch'])} Ceramic Pie Dish, {pick(rng, COLOURS)}",
        ],
    )


KITCHEN = [
    (k_pan, 20),
    (k_cookware_set, 10),
    (k_knife, 20),
    (k_blender, 14),
    (k_appliance, 18),
    (k_board, 10),
    (k_storage, 12),
    (k_tools, 18),
    (k_bakeware, 14),
]

# ---------------------------------------------------------------------------
# Office
# ---------------------------------------------------------------------------
OFF_BRANDS = [
    "Penwell",
    "Deskly",
    "Inkstone",
    "PaperCrest",
    "Clipton",
    "Markwise",
    "Ledgerline",
    "Officio",
    "Brightnote",
    "Quillmark",
    "Stackwell",
    "Notara",
]
INK = ["Black", "Blue", "Red", "Assorted Colors", "Black and Blue"]


def o_pen(rng):
    b = pick(rng, OFF_BRANDS)
    kind = pick(
        rng,
        [
            "Gel Ink Rollerball Pens",
            "Retractable Ballpoint Pens",
            "Quick-Dry Gel Pens",
            "Fountain Pen Set with Ink Cartridges",
            "Felt Tip Pens",
            "Erasable Gel Pens",
            "Fine Liner Drawing Pens",
        ],
    )
    point = pick(
        rng, ["Fine Point 0.5mm", "Fine Point 0.7mm", "Medium Point 1.0mm", "Extra Fine 0.38mm"]
    )
    return f"{b} {kind}, {point}, {pick(rng, INK)}, {pick(rng, ['12', '24', '36', '60'])} Count"


def o_pencil(rng):
    b = pick(rng, OFF_BRANDS)
    if rng.random() < 0.5:
        return (
            f"{b} Mechanical Pencils, {pick(rng, ['0.5mm', '0.7mm', '0.9mm'])}, "
            f"with Lead Refills and Erasers, {pick(rng, ['6', '12', '24'])} Count"
        )
    return (
        f"{b} {pick(rng, ['Pre-Sharpened', 'Unsharpened', 'Cedar'])} Wood-Cased #2 HB Pencils, "
        f"{pick(rng, ['Yellow', 'Black', 'Natural'])}, {pick(rng, ['24', '48', '72', '96'])} Count"
    )


def o_paper(rng):
    b = pick(rng, OFF_BRANDS)
    return (
        f"{b} Multipurpose Copy Paper, 8.5 x 11 Inch, {pick(rng, ['20 lb', '24 lb', '28 lb'])}, "
        f"{pick(rng, ['92', '96', '98'])} Bright White, "
        f"{pick(rng, ['500 Sheets', '1 Ream', '5 Reams', '10 Reams'])}"
    )


def o_notebook(rng):
    b = pick(rng, OFF_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['1-Subject', '3-Subject', '5-Subject'])} Spiral Notebook, "
            f"{pick(rng, ['College Ruled', 'Wide Ruled'])}, "
            f"{pick(rng, ['70', '100', '150'])} Sheets, "
            f"Pack of {pick(rng, ['3', '4', '6'])}",
            f"{b} Hardcover {pick(rng, ['Dotted', 'Lined', 'Grid', 'Blank'])} Journal, "
            f"A5, {pick(rng, ['160', '192', '240'])} Pages, "
            f"{pick(rng, ['Black', 'Navy', 'Forest Green', 'Burgundy'])}",
            f"{b} Composition Notebooks, "
            f"{pick(rng, ['College Ruled', 'Wide Ruled', 'Graph Ruled'])}, "
            f"100 Sheets, {pick(rng, ['Marble Cover', 'Assorted Colors'])}, "
            f"{pick(rng, ['4', '6', '12'])} Pack",
            f"{b} Legal Pads, {pick(rng, ['8.5 x 11.75 Inch', '5 x 8 Inch'])}, "
            f"{pick(rng, ['Canary Yellow', 'White'])}, 50 Sheets, {pick(rng, ['6', '12'])} Pack",
        ],
    )


def o_sticky(rng):
    b = pick(rng, OFF_BRANDS)
    return (
        f"{b} "
        f"{pick(rng, ['Sticky Notes', 'Super Sticky Notes', 'Lined Sticky Notes', 'Page Flags'])}, "
        f"{pick(rng, ['3 x 3 Inch', '4 x 6 Inch', '1.5 x 2 Inch'])}, "
        f"{pick(rng, ['Pastel Colors', 'Canary Yellow', 'Bright Neon Colors'])}, "
        f"{pick(rng, ['12', '18', '24'])} Pads"
    )


def o_stapler(rng):
    b = pick(rng, OFF_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['Desktop', 'Heavy Duty', 'Electric', 'Half Strip'])} Stapler, "
            f"{pick(rng, ['20', '25', '40', '100'])} Sheet Capacity, "
            f"{pick(rng, ['Black', 'Silver', 'Blue'])}",
            f"{b} Standard Staples, 1/4 Inch Leg, {pick(rng, ['5,000', '10,000', '25,000'])} Count",
            f"{b} {pick(rng, ['Two-Hole', 'Three-Hole'])} Paper Punch, "
            f"{pick(rng, ['12', '20', '30'])} Sheet Capacity",
            f"{b} Staple Remover, {pick(rng, ['Black', 'Gray'])}, {pick(rng, ['2', '3'])} Pack",
        ],
    )


def o_filing(rng):
    b = pick(rng, OFF_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['1 Inch', '1.5 Inch', '2 Inch', '3 Inch'])} 3-Ring View Binder, "
            f"{pick(rng, ['D-Ring', 'Round Ring'])}, "
            f"{pick(rng, ['White', 'Black', 'Assorted Colors'])}, "
            f"{pick(rng, ['4', '6', '12'])} Pack",
            f"{b} {pick(rng, ['Letter Size', 'Legal Size'])} File Folders, 1/3 Cut Tab, "
            f"{pick(rng, ['Manila', 'Assorted Colors'])}, {pick(rng, ['50', '100'])} Count",
            f"{b} Hanging File Folders, {pick(rng, ['Letter Size', 'Legal Size'])}, "
            f"{pick(rng, ['Green', 'Assorted Colors'])}, {pick(rng, ['25', '50'])} Count",
            f"{b} Plastic Two-Pocket Folders with Prongs, Letter Size, "
            f"{pick(rng, ['Assorted Colors', 'Black'])}, {pick(rng, ['12', '24'])} Pack",
            f"{b} Expanding File Organizer, {pick(rng, ['13', '24'])} Pockets, Letter Size",
            f"{b} "
            f"{pick(rng, ['5-Tab', '8-Tab', '12-Tab'])} Binder Dividers, Insertable, Multicolor, "
            f"{pick(rng, ['6', '12'])} Sets",
        ],
    )


def o_marker(rng):
    b = pick(rng, OFF_BRANDS)
    return pick(
        rng,
        [
            f"{b} {pick(rng, ['Chisel Tip', 'Dual Tip', 'Gel'])} Highlighters, "
            f"{pick(rng, ['Fluorescent', 'Pastel', 'Assorted'])} Colors, "
            f"{pick(rng, ['6', '12', '24'])} Count",
            f"{b} Permanent Markers, "
            f"{pick(rng, ['Fine Point', 'Ultra Fine Point', 'Chisel Tip'])}, "
            f"{pick(rng, ['Black', 'Assorted Colors'])}, {pick(rng, ['12', '24', '36'])} Count",
            f"{b} Low Odor Dry Erase Markers, {pick(rng, ['Chisel Tip', 'Fine Tip'])}, "
            f"{pick(rng, ['Black', 'Assorted Colors'])}, {pick(rng, ['4', '8', '12'])} Count",
        ],
    )


def o_desk(rng):
    b = pick(rng, OFF_BRANDS)
    c = pick(rng, ["Black", "White", "Gold", "Silver", "Walnut"])
    return pick(
        rng,
        [
            f"{b} Mesh Desk Organizer with {pick(rng, ['5', '6'])} Compartments and Drawer, {c}",
            f"{b} {pick(rng, ['3-Tier', '2-Tier'])} Stackable Letter Tray, {c}",
            f"{b} {pick(rng, ['Bamboo', 'Metal Mesh', 'Acrylic'])} Pen Holder Cup, {c}, 2 Pack",
            f"{b} Monitor Stand Riser with Storage Drawer, {c}",
            f"{b} Large Desk Pad, "
            f"{pick(rng, ['31.5 x 15.7 Inch', '35 x 17 Inch'])}, PU Leather, {c}",
            f"{b} Magnetic Dry Erase Whiteboard, {pick(rng, ['24 x 36 Inch', '36 x 48 Inch'])}, "
            f"{pick(rng, ['Aluminum Frame', 'Wood Frame'])}",
            f"{b} {pick(rng, ['Cork', 'Fabric'])} Bulletin Board, "
            f"{pick(rng, ['17 x 23 Inch', '24 x 36 Inch'])}, "
            f"with Push Pins",
        ],
    )


def o_misc(rng):
    b = pick(rng, OFF_BRANDS)
    return pick(
        rng,
        [
            f"{b} Transparent Tape Refills, 3/4 x 1000 Inch, {pick(rng, ['6', '12', '24'])} Rolls",
            f"{b} {pick(rng, ['Packing Tape', 'Heavy Duty Shipping Tape'])}, 1.88 Inch x 55 Yards, "
            f"Clear, {pick(rng, ['6', '12'])} Rolls",
            f"{b} {pick(rng, ['#10', '6 x 9 Inch', '9 x 12 Inch'])} Self-Seal "
            f"{pick(rng, ['Security Envelopes', 'Kraft Catalog Envelopes', 'White Envelopes'])}, "
            f"{pick(rng, ['100', '250', '500'])} Count",
            f"{b} "
            f"{pick(rng, ['Address Labels', 'Shipping Labels', 'Removable File Folder Labels'])} "
            f"for Laser and Inkjet Printers, {pick(rng, ['750', '1500', '3000'])} Labels",
            f"{b} {pick(rng, ['Jumbo', 'Standard', 'Vinyl Coated'])} Paper Clips, "
            f"{pick(rng, ['Silver', 'Assorted Colors'])}, {pick(rng, ['500', '1000'])} Count",
            f"{b} Binder Clips, "
            f"{pick(rng, ['Small 3/4 Inch', 'Medium 1.25 Inch', 'Assorted Sizes'])}, "
            f"{pick(rng, ['Black', 'Assorted Colors'])}, {pick(rng, ['60', '120', '200'])} Count",
            f"{b} {pick(rng, ['Basic', 'Scientific', 'Desktop Printing'])} Calculator, "
            f"{pick(rng, ['10-Digit', '12-Digit'])} Display, Solar and Battery Powered",
            f"{b} {pick(rng, ['Thermal', 'Cold'])} Laminator, 9 Inch, with "
            f"{pick(rng, ['20', '50', '100'])} Laminating Pouches",
        ],
    )


OFFICE = [
    (o_pen, 18),
    (o_pencil, 10),
    (o_paper, 10),
    (o_notebook, 16),
    (o_sticky, 10),
    (o_stapler, 12),
    (o_filing, 18),
    (o_marker, 14),
    (o_desk, 14),
    (o_misc, 20),
]

# ---------------------------------------------------------------------------
# Games (invented titles; the same game never appears twice)
# ---------------------------------------------------------------------------
PLATFORMS = ["PlayStation 5", "PlayStation 4", "Xbox Series X", "Xbox One", "Nintendo Switch", "PC"]
EDITIONS = [
    "Standard Edition",
    "Deluxe Edition",
    "Gold Edition",
    "Collector's Edition",
    "Complete Edition",
    "Launch Edition",
    "Game of the Year Edition",
]

# genre: (first parts, second parts, joiner, subtitles, quota)
GAME_GENRES = {
    "fantasy_rpg": (
        [
            "Chronicles of",
            "Legends of",
            "Saga of",
            "Oath of",
            "Shadows of",
            "Heirs of",
            "Ballad of",
            "Relics of",
        ],
        [
            "the Ember Throne",
            "the Ashen Crown",
            "Eldermoor",
            "the Runeblade",
            "Valdris",
            "the Dragonspire",
            "the Moonlit Keep",
            "Thornwick",
            "the Wyrmwood",
            "the Silver Wyvern",
            "the Sorcerer King",
        ],
        " ",
        [
            "A Fantasy Role-Playing Adventure",
            "Swords and Sorcery",
            "The Dragon Awakens",
            "Quest of the Fallen Paladin",
            "Open World Fantasy RPG",
        ],
        22,
    ),
    "scifi_shooter": (
        ["Void", "Orbital", "Ironclad", "Starfall", "Nova", "Helix", "Titanfront", "Darkstar"],
        ["Sentinel", "Siege", "Frontier", "Vanguard", "Outpost", "Legion", "Odyssey"],
        " ",
        [
            "Galactic Warfare",
            "Mars Offensive",
            "First-Person Space Combat",
            "Armored Squad Tactics",
            "Invasion of Kepler Station",
        ],
        18,
    ),
    "racing": (
        ["Turbo", "Redline", "Asphalt Thunder", "Nitro", "Overdrive", "Grand Circuit", "Gearshift"],
        ["Rivals", "Velocity", "Street Kings", "Rally Masters", "Drift Kings", "Motorsport"],
        " ",
        [
            "Open World Street Racing",
            "Off-Road Rally Championship",
            "Kart Racing Party",
            "Supercar Endurance",
        ],
        14,
    ),
    "sports": (
        [
            "Pro Striker Soccer",
            "Hardwood Legends Basketball",
            "Gridiron Glory Football",
            "Ace Court Tennis",
            "Fairway Pro Golf Tour",
            "Slapshot League Hockey",
            "Home Run Heroes Baseball",
            "Touchline Manager Soccer",
        ],
        ["2022", "2023", "2024", "World Tour", "Championship Season", "All-Stars"],
        " ",
        ["Ultimate Team", "Career Mode", "Franchise Manager", "Online League"],
        16,
    ),
    "horror": (
        [
            "The Whispering",
            "Bleak",
            "Crimson",
            "The Forgotten",
            "Ravenmoor",
            "Pale Lantern",
            "Dreadmire",
        ],
        ["Asylum", "Ward", "Manor", "Cellar", "Sanatorium", "Orphanage", "Lighthouse"],
        " ",
        [
            "Survival Horror",
            "A Haunted House Mystery",
            "Nightmare Edition",
            "Escape the Dark",
            "The Curse Returns",
        ],
        14,
    ),
    "strategy": (
        ["Banners of", "Crowns of", "Warlords of", "Dynasties of", "Frontiers of", "Sieges of"],
        [
            "the Five Realms",
            "the Iron Age",
            "the Northern Front",
            "the Ancient Kingdoms",
            "the Steppe",
            "the Sunken Empire",
        ],
        " ",
        [
            "Real-Time Strategy",
            "Turn-Based Grand Strategy",
            "Build Your Empire",
            "Medieval Warfare",
            "City Builder",
        ],
        14,
    ),
    "life_sim": (
        [
            "Meadowbrook",
            "Willowdale",
            "Sunny Acres",
            "Honeyvale",
            "Cozy Hollow",
            "Clover Creek",
            "Little Lantern",
        ],
        [
            "Farm Story",
            "Village Life",
            "Island Getaway",
            "Harvest Days",
            "Cafe Stories",
            "Pet Rescue",
        ],
        " ",
        ["Farming Simulator", "Cozy Life Sim", "Build Your Dream Town", "Crops and Critters"],
        12,
    ),
    "platformer": (
        [
            "Pip & Pebble's",
            "Captain Sprocket's",
            "Bouncy Bean's",
            "Mossy and Moe's",
            "Tumble Fox's",
            "Sir Waddles'",
        ],
        [
            "Great Adventure",
            "Sky Quest",
            "Jungle Jump",
            "Cloud Kingdom Caper",
            "Candy Mountain Escape",
        ],
        " ",
        ["Family Platformer", "2-Player Co-Op", "Jump and Run Adventure", "Kids Party Pack"],
        12,
    ),
    "fighting": (
        ["Fist of the", "Iron Knuckle", "Blade Arena", "Thunderclap", "Dragon Palm"],
        ["Tempest", "Champions", "Brawlers", "Dojo Masters", "Warriors"],
        " ",
        ["Arcade Fighting", "Ultimate Tournament", "Martial Arts Showdown", "Brawler Championship"],
        10,
    ),
    "puzzle": (
        [
            "Puzzle Garden",
            "Block Cascade",
            "Gem Tumble",
            "Mind Maze",
            "Word Orchard",
            "Tile Temple",
        ],
        ["Party", "Deluxe", "Challenge", "Collection", "Quest"],
        " ",
        [
            "Brain Teaser Puzzles",
            "Match-3 Puzzle Game",
            "Logic Puzzle Collection",
            "Family Trivia Night",
        ],
        10,
    ),
}


def make_game_gen(genre):
    first, second, joiner, subtitles, _ = GAME_GENRES[genre]

    def gen(rng):
        name = f"{pick(rng, first)}{joiner}{pick(rng, second)}"
        r = rng.random()
        if r < 0.45:
            name = f"{name}: {pick(rng, subtitles)}"
        elif r < 0.6:
            name = f"{name} {pick(rng, ['II', 'III', 'IV'])}"
        return f"{name} - {pick(rng, EDITIONS)} - {pick(rng, PLATFORMS)}"

    gen.__name__ = f"game_{genre}"
    return gen


GAMES = [(make_game_gen(g), spec[-1]) for g, spec in GAME_GENRES.items()]

# ---------------------------------------------------------------------------
# Movies (invented titles built from invented places/characters; each film once)
# ---------------------------------------------------------------------------
FORMATS = [
    "Blu-ray + Digital",
    "DVD",
    "4K Ultra HD + Blu-ray",
    "Blu-ray",
    "DVD + Digital",
    "4K Ultra HD + Digital",
]
CUTS = [
    "",
    "",
    "",
    "",
    " - Director's Cut",
    " - Special Edition",
    " - Extended Edition",
    " - Collector's Edition",
]

# genre: (templates, slot vocabularies, quota)
MOVIE_GENRES = {
    "scifi": (
        [
            "{p}: The Last {x}",
            "The {x} at {p}",
            "Beyond {p}: {x}",
            "Echoes from {p}",
            "Starship {s}: {x}",
        ],
        {
            "p": [
                "Kepler Station",
                "Titan Outpost",
                "Station Meridian",
                "Hyperion Deep",
                "the Vesper Colony",
                "Outpost Theta-9",
                "the Orion Relay",
            ],
            "x": ["Signal", "Drift", "Horizon", "Exodus", "Eclipse", "Frequency"],
            "s": ["Calliope", "Perihelion", "Aster", "Nightjar"],
        },
        18,
    ),
    "horror": (
        [
            "The Haunting of {p}",
            "The {x} at {p}",
            "{p}: Don't Go in the {x}",
            "What Waits in the {x} of {p}",
        ],
        {
            "p": [
                "Blackwood Manor",
                "Raven's Creek",
                "Hollow Pines",
                "Grimsby Farm",
                "St. Agnes Hospital",
                "Cinder Lake",
                "Ashgrove House",
            ],
            "x": ["Cellar", "Attic", "Crypt", "Well", "Chapel", "Nursery"],
        },
        17,
    ),
    "romance": (
        [
            "Letters to {p}",
            "A Summer at the {p} {x}",
            "Love at the {x} in {p}",
            "Meet Me at the {x} in {p}",
            "Always, {p}",
        ],
        {
            "p": [
                "Juniper Bay",
                "Willow Harbor",
                "Marigold Cove",
                "Port Ellery",
                "Lake Avalon",
                "Larkspur Lane",
                "Rosemere",
            ],
            "x": ["Bookshop", "Flower Stall", "Lighthouse", "Bakery", "Vineyard", "Inn"],
        },
        16,
    ),
    "western": (
        [
            "Dust over {p}",
            "The {x} of {p}",
            "Showdown at {p}",
            "Last Stagecoach to {p}",
            "A {x} Rides to {p}",
        ],
        {
            "p": [
                "Red Mesa",
                "Coyote Pass",
                "Dry Gulch",
                "Silver Creek",
                "Copper Ridge",
                "Bitterroot Flats",
                "Sawtooth Crossing",
            ],
            "x": ["Gunslinger", "Outlaw", "Rustler", "Marshal", "Bounty Hunter", "Drifter"],
        },
        14,
    ),
    "crime": (
        ["The {p} {x}", "Cold Case: The {p} {x}", "No Witnesses in {p}", "The {x}: A {p} Story"],
        {
            "p": [
                "Harbor City",
                "Marlow Street",
                "Calloway Avenue",
                "South Ferris",
                "Precinct 17",
                "Dockside",
            ],
            "x": ["Ledger", "Heist", "Informant", "Alibi", "Wiretap", "Getaway"],
        },
        16,
    ),
    "animated": (
        ["{c} and the {x}", "{c}'s Great {x} Adventure", "{c} Saves the {x}"],
        {
            "c": [
                "Pip the Otter",
                "Hazel the Hedgehog",
                "Captain Whiskers",
                "Bramble Bear",
                "Luna the Little Dragon",
                "Ollie Owl",
            ],
            "x": [
                "Moon Balloon",
                "Candy Forest",
                "Sky Garden",
                "Toy Parade",
                "Snowflake Festival",
                "Rainbow Reef",
            ],
        },
        16,
    ),
    "war": (
        [
            "The Long Winter at {p}",
            "The Last {x} at {p}",
            "Holding {p}",
            "Hold the Line: {p}",
            "The Forgotten {x} of {p}",
        ],
        {
            "p": [
                "Ardenne Ridge",
                "Hill 402",
                "Fort Halden",
                "Varenne Crossing",
                "Kessel Pass",
                "Point Alder",
                "Brennic Bridge",
            ],
            "x": ["Battalion", "Brigade", "Company", "Regiment", "Platoon"],
        },
        14,
    ),
    "comedy": (
        [
            "My Neighbor's {x}",
            "Road Trip to {p} with a {x}",
            "Dad vs. the {x}",
            "Stuck in {p} with a {x}",
            "The {x} That Crashed the Wedding",
        ],
        {
            "p": ["Tuscaloosa", "Branson", "Boise", "Lake Winnetka", "Cape Ellery", "Duluth"],
            "x": [
                "Llama",
                "Goat",
                "Karaoke Machine",
                "Wedding Planner",
                "Food Truck",
                "Minivan",
                "Parrot",
            ],
        },
        15,
    ),
    "documentary": (
        [
            "{x}: A Journey Through {p}",
            "Into {p}: The Story of the {x}",
            "Seasons of {p}: {x}",
            "{p} Uncovered: {x}",
        ],
        {
            "p|x": [
                ("the Arctic", "Polar Bears"),
                ("the Arctic", "Glaciers"),
                ("the Amazon", "Rainforests"),
                ("the Amazon", "River Dolphins"),
                ("the Serengeti", "Lions"),
                ("the Serengeti", "Wildebeest Migration"),
                ("the Deep Ocean", "Humpback Whales"),
                ("the Deep Ocean", "Giant Squid"),
                ("the Himalayas", "Snow Leopards"),
                ("the Himalayas", "Glaciers"),
                ("the Coral Sea", "Coral Reefs"),
                ("the Coral Sea", "Sea Turtles"),
            ]
        },
        12,
    ),
}


def make_movie_gen(genre):
    templates, slots, _ = MOVIE_GENRES[genre]

    def gen(rng):
        template = pick(rng, templates)
        fill = {}
        for k, v in sorted(slots.items()):
            choice = pick(rng, v)
            if "|" in k:  # jointly chosen slots keep e.g. place and subject coherent
                fill.update(zip(k.split("|"), choice, strict=True))
            else:
                fill[k] = choice
        name = template.format(**fill)
        name = name[0].upper() + name[1:]
        return f"{name}{pick(rng, CUTS)} ({pick(rng, FORMATS)}, {rng.randint(1978, 2023)})"

    gen.__name__ = f"movie_{genre}"
    return gen


MOVIES = [(make_movie_gen(g), spec[-1]) for g, spec in MOVIE_GENRES.items()]


def game_key(title: str) -> str:
    """Game name without edition/platform, so each invented game is listed once."""
    return title.split(" - ")[0]


def movie_key(title: str) -> str:
    """Film name without cut/format/year, so each invented film is listed once."""
    return title.rsplit(" (", 1)[0].split(" - ")[0]


# ---------------------------------------------------------------------------
DOMAINS = [
    # (id prefix, domain, [(generator, quota)], dedup key)
    ("groc", "Groceries", GROCERIES, None),
    ("kit", "Kitchen", KITCHEN, None),
    ("off", "Office", OFFICE, None),
    ("game", "Games", GAMES, game_key),
    ("movie", "Movies", MOVIES, movie_key),
]


def build_catalog(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    seen: set[str] = set()  # membership tests only; never iterated (hash order)
    seen_keys: set[str] = set()
    items: list[dict] = []
    for prefix, domain, generators, key in DOMAINS:
        titles: list[str] = []
        for gen, quota in generators:
            made, attempts = 0, 0
            while made < quota:
                attempts += 1
                if attempts > quota * 200:
                    raise RuntimeError(f"{domain}/{gen.__name__}: vocabulary too small")
                title = " ".join(gen(rng).split())
                k = key(title) if key else title
                if title in seen or k in seen_keys:
                    continue
                seen.add(title)
                seen_keys.add(k)
                titles.append(title)
                made += 1
        rng.shuffle(titles)  # interleave sub-categories within the domain
        for i, title in enumerate(titles, start=1):
            items.append({"item_id": f"{prefix}-{i:04d}", "domain": domain, "title": title})

    # Zipf-like popularity over a random global ranking, with mild jitter.
    ranks = list(range(1, len(items) + 1))
    rng.shuffle(ranks)
    for item, rank in zip(items, ranks, strict=True):
        base = ZIPF_SCALE / rank**ZIPF_EXPONENT
        item["popularity"] = max(1, int(round(base * rng.uniform(0.9, 1.1))))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_PATH)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    items = build_catalog(args.seed)
    with open(args.out, "w", encoding="utf-8", newline="\n") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=True) + "\n")
    print(f"wrote {len(items)} items to {args.out}")


if __name__ == "__main__":
    main()
