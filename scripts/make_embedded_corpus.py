"""Build megatron_mixln/data/assets/enwiki_sample.jsonl.gz from the Wikipedia sample in the gensim wheel.

Usage: python scripts/make_embedded_corpus.py [WIKI_XML_BZ2] [OUT_JSONL_GZ]
(`pip download --no-deps gensim==4.4.0` gives the wheel; the .bz2 is gensim/test/test_data/
enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2). Standard library only.
"""
from __future__ import annotations

import bz2
import gzip
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

DEFAULT_INPUT = "/tmp/gs/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "megatron_mixln/data/assets/enwiki_sample.jsonl.gz"

# Sections after which an article is lists of links and citations, not prose.
TRAILING_SECTIONS = re.compile(
    r"^=+\s*(see also|references|notes|footnotes|further reading|external links|bibliography|sources|"
    r"citations|works cited|works|selected works|filmography|discography)\s*=+\s*$",
    re.IGNORECASE | re.MULTILINE)
DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "wiktionary:")
# Interlanguage links such as [[fr:Anarchisme]] carry no prose either.
INTERLANGUAGE_LINK = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")
MIN_PARAGRAPH_WORDS = 20
SENTENCE_ENDS = (".", "!", "?", "\"", "'", ")")  # a paragraph not ending like this is a caption or a leftover
MIN_DOCUMENT_WORDS = 100
MAX_DOCUMENT_WORDS = 400
TARGET_DOCUMENT_WORDS = 150  # a chunk closes once it reaches this many words
MAX_PARAGRAPHS_PER_DOCUMENT = 3


def remove_nested(text: str, innermost: re.Pattern) -> str:
    """Delete innermost matches until none is left (templates and tables nest)."""
    while True:
        text, count = innermost.subn("", text)
        if count == 0:
            return text


def replace_link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(DROPPED_LINK_PREFIXES) or INTERLANGUAGE_LINK.match(lowered):
        return ""
    shown = match.group(1).rsplit("|", 1)[-1] if label else target
    return shown.lstrip(":")


def keep_template_text(text: str) -> str:
    """Replace the few templates that carry prose by their text; every other template is dropped."""
    text = re.sub(r"\{\{\s*convert\|([-\d.,]+)\|(?:-|to|and|or)\|([-\d.,]+)\|([^|{}]+)[^{}]*\}\}", r"\1 to \2 \3", text,
                  flags=re.IGNORECASE)
    text = re.sub(r"\{\{\s*convert\|([-\d.,]+)\|([^|{}]+)[^{}]*\}\}", r"\1 \2", text, flags=re.IGNORECASE)
    text = re.sub(r"\{\{\s*([Aa])s of\|(\d{4})[^{}]*\}\}", r"\1s of \2", text)
    text = re.sub(r"\{\{\s*(?:lang|transl)\|[^|{}]+\|([^|{}]+)\}\}", r"\1", text, flags=re.IGNORECASE)
    return re.sub(r"\{\{\s*(?:nowrap|small|smaller|nobr)\|([^|{}]+)\}\}", r"\1", text, flags=re.IGNORECASE)


def strip_markup(wikitext: str) -> str:
    """Wikitext -> plain text with paragraphs separated by blank lines."""
    text = TRAILING_SECTIONS.split(wikitext, maxsplit=1)[0]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|table)[^>]*>.*?</\1>", "", text,
                  flags=re.DOTALL | re.IGNORECASE)
    text = keep_template_text(text)
    text = remove_nested(text, re.compile(r"\{\{[^{}]*\}\}"))
    text = remove_nested(text, re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL))
    # Innermost links first, so a [[File:...]] caption's own links are resolved before the file is dropped.
    link = re.compile(r"\[\[([^\[\]]*)\]\]")
    while True:
        text, count = link.subn(replace_link, text)
        if count == 0:
            break
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?:)?//[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text).replace("\u00a0", " ")

    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        # Headings, lists, indents and table or template leftovers are not prose.
        lines = [line.strip() for line in block.split("\n")
                 if line.strip() and not re.match(r"\s*(=|\*|#|:|;|\||!|\{|\}|-{4})", line)]
        paragraph = tidy(" ".join(lines))
        if len(paragraph.split()) >= MIN_PARAGRAPH_WORDS and paragraph.endswith(SENTENCE_ENDS):
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def tidy(text: str) -> str:
    """Repair the punctuation that removed templates and references leave behind."""
    text = re.sub(r"\(\s*(?:[,;]\s*)+", "(", text)  # "(; , Akhilleus" where pronunciations were
    text = re.sub(r"(?:\s*[,;])+\s*\)", ")", text)
    text = re.sub(r"\s*\(\s*\)", "", text)
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r"([,;])\1+", r"\1", text)
    return text.strip().lstrip(",;:. ")


def split_long(paragraph: str) -> list[str]:
    """Split a paragraph longer than MAX_DOCUMENT_WORDS at sentence ends."""
    if len(paragraph.split()) <= MAX_DOCUMENT_WORDS:
        return [paragraph]
    pieces, current = [], []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
        if current and len(" ".join(current + [sentence]).split()) > MAX_DOCUMENT_WORDS // 2:
            pieces.append(" ".join(current))
            current = []
        current.append(sentence)
    if current:
        pieces.append(" ".join(current))
    return pieces


def chunk_article(text: str) -> list[str]:
    """Group consecutive paragraphs into web-document-sized chunks of 1-3 paragraphs."""
    paragraphs = [piece for paragraph in text.split("\n\n") if paragraph for piece in split_long(paragraph)]
    chunks, current, words = [], [], 0
    for paragraph in paragraphs:
        n = len(paragraph.split())
        if current and (words + n > MAX_DOCUMENT_WORDS or len(current) == MAX_PARAGRAPHS_PER_DOCUMENT):
            chunks.append(current)
            current, words = [], 0
        current.append(paragraph)
        words += n
        if words >= TARGET_DOCUMENT_WORDS:
            chunks.append(current)
            current, words = [], 0
    if current:
        chunks.append(current)
    return ["\n\n".join(chunk) for chunk in chunks if len(" ".join(chunk).split()) >= MIN_DOCUMENT_WORDS // 2]


def iter_articles(path: str):
    """(title, revision timestamp, wikitext) of every non-redirect main-namespace page."""
    with bz2.open(path, "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            ns = element.tag[: -len("page")]
            title = element.findtext(f"{ns}title")
            text = element.findtext(f"{ns}revision/{ns}text") or ""
            timestamp = element.findtext(f"{ns}revision/{ns}timestamp")
            is_redirect = element.find(f"{ns}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT")
            if element.findtext(f"{ns}ns") == "0" and not is_redirect:
                yield title, timestamp, text
            element.clear()


def main(argv: list[str]) -> None:
    source = argv[0] if argv else DEFAULT_INPUT
    output = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUTPUT
    output.parent.mkdir(parents=True, exist_ok=True)
    articles = documents = words = 0
    # mtime=0 keeps the gzip bytes reproducible run to run.
    with open(output, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as out:
        for title, timestamp, wikitext in iter_articles(source):
            chunks = chunk_article(strip_markup(wikitext))
            articles += bool(chunks)
            url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
            for chunk in chunks:
                record = {"text": chunk, "timestamp": timestamp, "url": url}
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                documents += 1
                words += len(chunk.split())
    print(f"{output}: {articles} articles, {documents} documents, {words} words, "
          f"{output.stat().st_size / 1e6:.2f} MB gzipped")


if __name__ == "__main__":
    main(sys.argv[1:])
