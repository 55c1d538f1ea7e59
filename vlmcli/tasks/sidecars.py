"""Sidecar files next to each image: IMAGE.txt (as captioning tools write them) or IMAGE.xmp (as
digiKam, darktable and Lightroom read them: the caption as dc:description, keywords as dc:subject).

An .xmp another tool wrote is merged into, not replaced: its other properties and namespaces stay,
dc:description's x-default text becomes the caption (other languages stay), and the keywords are
added to its dc:subject. Either form is written only with --overwrite when the file exists.
"""

from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

FORMS = ("txt", "xmp")

X = "adobe:ns:meta/"
RDF = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DC = "http://purl.org/dc/elements/1.1/"
XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"
# Prefixes written as photo tools write them (ElementTree would say ns0, ns1 otherwise); an existing
# file's own prefixes are kept as well (see _merge).
PREFIXES = {
    "x": X,
    "rdf": RDF,
    "dc": DC,
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "xmpMM": "http://ns.adobe.com/xap/1.0/mm/",
    "photoshop": "http://ns.adobe.com/photoshop/1.0/",
    "lr": "http://ns.adobe.com/lightroom/1.0/",
    "exif": "http://ns.adobe.com/exif/1.0/",
    "tiff": "http://ns.adobe.com/tiff/1.0/",
    "digiKam": "http://www.digikam.org/ns/1.0/",
    "darktable": "http://darktable.sf.net/",
}
# A structured answer's properties read as the description, first found first.
DESCRIPTION_KEYS = ("description", "caption")


@dataclass
class Sidecars:
    overwrite: bool = False
    form: str = "txt"  # txt | xmp
    written: dict[str, str] = field(default_factory=dict)  # sidecar -> image, in this run

    @property
    def suffix(self) -> str:
        return "." + self.form

    def path_for(self, image: str) -> str:
        return os.path.splitext(image)[0] + self.suffix

    def blocks(self, image: str) -> bool:
        """True when the image should be skipped: its sidecar exists and --overwrite was not given."""
        return not self.overwrite and os.path.exists(self.path_for(image))

    def write(self, image: str, text: str, record: dict[str, Any] | None = None) -> str | None:
        """Write the sidecar atomically (an .xmp merged into the one there); returns an error message
        instead of clobbering. `text` is the record as one line; `record` gives an .xmp its keywords."""
        target = self.path_for(image)
        other = self.written.get(os.path.abspath(target))
        if other is not None and other != os.path.abspath(image):
            return f"sidecar {target} was already written for {other} in this run (same name, other extension)"
        exists = os.path.exists(target)
        if not self.overwrite and exists:
            return f"sidecar {target} exists (pass --overwrite to replace it)"
        if self.form == "xmp":
            description, keywords = xmp_fields(text, record or {})
            try:
                data = merge_xmp(target if exists else None, description, keywords)
            except (ET.ParseError, ValueError) as e:
                return f"sidecar {target} is not XMP that vlm can merge into ({e}); move it away or fix it"
            except OSError as e:
                return f"cannot read sidecar {target} ({e.strerror})"
        else:
            data = (text.strip() + "\n").encode("utf-8")
        tmp = f"{target}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return f"cannot write sidecar {target} ({e.strerror})"
        self.written[os.path.abspath(target)] = os.path.abspath(image)
        return None


def xmp_fields(text: str, record: dict[str, Any]) -> tuple[str | None, list[str]]:
    """(description, keywords) of a record: a structured answer's description/caption string and
    its lists of strings (tags); otherwise the text is the description."""
    value = record.get("json")
    if value is None and record.get("answers"):
        value = record["answers"][0].get("json")
    if not isinstance(value, dict):
        return (text.strip() or None), []
    description = next((value[k] for k in DESCRIPTION_KEYS if isinstance(value.get(k), str)), None)
    keywords: list[str] = []
    for v in value.values():
        if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
            keywords += [x.strip() for x in v if x.strip() and x.strip() not in keywords]
    return (description.strip() if description else None), keywords


def merge_xmp(path: str | None, description: str | None, keywords: list[str]) -> bytes:
    """The XMP packet for `path` (None: a new one) with the description and keywords set."""
    for prefix, uri in PREFIXES.items():
        ET.register_namespace(prefix, uri)
    if path is None:
        root = ET.Element(f"{{{X}}}xmpmeta")
    else:
        with open(path, "rb") as f:
            raw = f.read()
        for _, (prefix, uri) in ET.iterparse(io.BytesIO(raw), events=("start-ns",)):
            if prefix and not prefix.startswith("ns"):
                ET.register_namespace(prefix, uri)
        root = ET.fromstring(raw)
    rdf = root if root.tag == f"{{{RDF}}}RDF" else root.find(f"{{{RDF}}}RDF")
    if rdf is None:
        if root.tag != f"{{{X}}}xmpmeta":
            raise ValueError(f"its root is {root.tag}, not x:xmpmeta or rdf:RDF")
        rdf = ET.SubElement(root, f"{{{RDF}}}RDF")
    descriptions = rdf.findall(f"{{{RDF}}}Description")
    if descriptions:
        desc = descriptions[0]
    else:
        desc = ET.SubElement(rdf, f"{{{RDF}}}Description", {f"{{{RDF}}}about": ""})
    if description is not None:
        _set_description(descriptions or [desc], desc, description)
    if keywords:
        _add_keywords(descriptions or [desc], desc, keywords)
    ET.indent(root, space=" ")
    body = ET.tostring(root, encoding="unicode")
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n' + body + '\n<?xpacket end="w"?>\n').encode()


def _find(descriptions: list[ET.Element], tag: str) -> ET.Element | None:
    for d in descriptions:
        found = d.find(tag)
        if found is not None:
            return found
    return None


def _set_description(descriptions: list[ET.Element], desc: ET.Element, text: str) -> None:
    prop = _find(descriptions, f"{{{DC}}}description")
    if prop is None:
        prop = ET.SubElement(desc, f"{{{DC}}}description")
    alt = prop.find(f"{{{RDF}}}Alt")
    if alt is None:
        prop.text = None
        alt = ET.SubElement(prop, f"{{{RDF}}}Alt")
    item = next((li for li in alt.findall(f"{{{RDF}}}li") if li.get(XML_LANG) == "x-default"), None)
    if item is None:
        item = ET.Element(f"{{{RDF}}}li", {XML_LANG: "x-default"})
        alt.insert(0, item)  # x-default comes first
    item.text = text


def _add_keywords(descriptions: list[ET.Element], desc: ET.Element, keywords: list[str]) -> None:
    prop = _find(descriptions, f"{{{DC}}}subject")
    if prop is None:
        prop = ET.SubElement(desc, f"{{{DC}}}subject")
    bag = prop.find(f"{{{RDF}}}Bag")
    if bag is None:
        bag = ET.SubElement(prop, f"{{{RDF}}}Bag")
    have = {li.text for li in bag.findall(f"{{{RDF}}}li")}
    for k in keywords:
        if k not in have:
            ET.SubElement(bag, f"{{{RDF}}}li").text = k
            have.add(k)
