"""The goodbooks-10k catalog bundled with ternrec: items and user→book interactions.

The bundle (ingest/data/goodbooks/) is built from the original files by
`python -m ingest.catalog build --source ../shared/data/goodbooks-10k`; it keeps only what the
demo uses: one row per book with its top tag names, and the `to_read` pairs, gzip-compressed.
Data: goodbooks-10k by Zygmunt Zajac, CC BY-SA 4.0 (see the LICENSE and ATTRIBUTION.md beside it).
"""

from __future__ import annotations

import argparse
import re
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from ingest.schema import ItemUpsert

BUNDLE_DIR = Path(__file__).resolve().parent / "data" / "goodbooks"
TOP_TAGS = 5

# Shelf-keeping tags say how a reader files a book, not what it is about.
_SHELF_TAG = re.compile(
    r"^(to-read|currently-reading|to-buy|wish-?list|re-?read|abandoned|dnf|did-not-finish|default|"
    r"books?|novels?|series|library|kindle|e-?books?|audio.*|.*audible.*|.*favou?rite.*|.*own.*|"
    r"my-.*|.*read-in.*|read-\d+|\d+-stars?|book-club|english|.*\d{4}.*|1001.*|-+|.*-i-.*)$"
)


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    authors: str
    year: int | None
    tags: tuple[str, ...]
    image_url: str
    average_rating: float
    ratings_count: int

    @property
    def text(self) -> str:
        """The one string the encoder embeds: title, authors and top tags."""
        text = f"{self.title} by {self.authors}"
        if self.tags:
            text += ". " + ", ".join(tag.replace("-", " ") for tag in self.tags)
        return text

    def to_event(self) -> ItemUpsert:
        return ItemUpsert(type="item_upsert", item_id=self.item_id, title=self.title, text=self.text,
                          authors=self.authors, year=self.year, tags=list(self.tags),
                          image_url=self.image_url)


def _top_tags(source: Path) -> pd.Series:
    """goodreads_book_id -> '|'-joined top tag names, shelf tags left out."""
    tags = pd.read_csv(source / "tags.csv")
    tags = tags[~tags.tag_name.str.fullmatch(_SHELF_TAG)]
    book_tags = pd.read_csv(source / "book_tags.csv").merge(tags, on="tag_id")
    book_tags = book_tags[book_tags["count"] > 0].sort_values(["goodreads_book_id", "count"],
                                                              ascending=[True, False])
    top = book_tags.groupby("goodreads_book_id").head(TOP_TAGS)
    return top.groupby("goodreads_book_id").tag_name.agg("|".join)


def build_bundle(source: Path, out_dir: Path = BUNDLE_DIR) -> None:
    """Writes the compressed catalog, interactions, license and attribution into out_dir."""
    missing = [f for f in ("books.csv", "tags.csv", "book_tags.csv", "to_read.csv", "LICENSE")
               if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    books = pd.read_csv(source / "books.csv")
    books["tags"] = books.goodreads_book_id.map(_top_tags(source)).fillna("")
    books = books.rename(columns={"book_id": "item_id", "original_publication_year": "year",
                                  "image_url": "image_url"})
    books["year"] = books.year.astype("Int64")
    columns = ["item_id", "title", "authors", "year", "tags", "image_url", "average_rating",
               "ratings_count"]
    books[columns].to_csv(out_dir / "books.csv.gz", index=False)
    pd.read_csv(source / "to_read.csv").to_csv(out_dir / "to_read.csv.gz", index=False)
    shutil.copyfile(source / "LICENSE", out_dir / "LICENSE")


@lru_cache(maxsize=1)
def load_items(bundle: Path = BUNDLE_DIR) -> tuple[Item, ...]:
    """All 10,000 books, in catalog order (by goodbooks book_id)."""
    books = pd.read_csv(bundle / "books.csv.gz", keep_default_na=False,
                        dtype={"item_id": str, "tags": str, "year": str})
    return tuple(
        Item(item_id=row.item_id, title=row.title, authors=row.authors,
             year=int(row.year) if row.year else None,
             tags=tuple(t for t in row.tags.split("|") if t), image_url=row.image_url,
             average_rating=float(row.average_rating), ratings_count=int(row.ratings_count))
        for row in books.itertuples(index=False)
    )


def load_interactions(bundle: Path = BUNDLE_DIR) -> pd.DataFrame:
    """User→book "want to read" pairs: columns user_id, item_id (strings), sorted by user."""
    pairs = pd.read_csv(bundle / "to_read.csv.gz", dtype={"user_id": str, "book_id": str})
    return pairs.rename(columns={"book_id": "item_id"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="rebuild the bundle from the original goodbooks-10k files")
    build.add_argument("--source", type=Path, default=Path("../shared/data/goodbooks-10k"))
    build.add_argument("--out", type=Path, default=BUNDLE_DIR)
    args = parser.parse_args()
    build_bundle(args.source, args.out)
    items = load_items(args.out)
    print(f"wrote {len(items)} books and {len(load_interactions(args.out))} interactions to {args.out}")
    print("example item text:", items[0].text)


if __name__ == "__main__":
    main()
