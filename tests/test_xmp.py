"""--sidecar xmp: photo.xmp as digiKam, darktable and Lightroom read it, merged into what another tool wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from vlmcli.tasks.sidecars import DC, RDF, XML_LANG, Sidecars, merge_xmp, xmp_fields

SAMPLE = Path(__file__).resolve().parents[1] / "vlmcli" / "data" / "chelsea.jpg"

DARKTABLE = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmp:Rating="3"
    darktable:xmp_version="5">
   <darktable:history>
    <rdf:Seq>
     <rdf:li darktable:operation="exposure" darktable:enabled="1"/>
    </rdf:Seq>
   </darktable:history>
   <dc:description>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">old caption</rdf:li>
     <rdf:li xml:lang="de">alte Beschreibung</rdf:li>
    </rdf:Alt>
   </dc:description>
   <dc:subject>
    <rdf:Bag>
     <rdf:li>holiday</rdf:li>
     <rdf:li>cat</rdf:li>
    </rdf:Bag>
   </dc:subject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def _read(data: bytes) -> tuple[dict[str | None, str | None], list[str | None], ET.Element]:
    root = ET.fromstring(data.split(b"?>", 1)[1].rsplit(b"<?xpacket", 1)[0])
    desc = root.find(f"{{{RDF}}}RDF/{{{RDF}}}Description")
    assert desc is not None
    alt = {li.get(XML_LANG): li.text for li in desc.iter(f"{{{RDF}}}li") if li.get(XML_LANG)}
    bag = [li.text for li in desc.findall(f"{{{DC}}}subject/{{{RDF}}}Bag/{{{RDF}}}li")]
    return alt, bag, desc


def test_a_new_xmp_has_the_caption_and_keywords() -> None:
    data = merge_xmp(None, "A cat on a sofa", ["cat", "sofa"])
    assert data.startswith(b"<?xpacket begin=") and b"<x:xmpmeta" in data and b'xmlns:dc="' in data
    alt, bag, _ = _read(data)
    assert alt == {"x-default": "A cat on a sofa"} and bag == ["cat", "sofa"]


def test_merging_keeps_what_another_tool_wrote(tmp_path: Path) -> None:
    path = tmp_path / "photo.xmp"
    path.write_text(DARKTABLE)
    data = merge_xmp(str(path), "A cat on a sofa", ["cat", "sofa"])
    alt, bag, desc = _read(data)
    assert alt == {"x-default": "A cat on a sofa", "de": "alte Beschreibung"}
    assert bag == ["holiday", "cat", "sofa"]  # added to, never duplicated
    assert desc.get("{http://ns.adobe.com/xap/1.0/}Rating") == "3"
    assert desc.find("{http://darktable.sf.net/}history") is not None
    assert b"xmlns:darktable=" in data and b"ns0:" not in data  # the other tool's prefixes stay


def test_fields_of_a_structured_record() -> None:
    record = {"json": {"caption": "A cat", "tags": ["cat", " pet "], "people": 0, "mixed": ["a", 1]}}
    assert xmp_fields("ignored", record) == ("A cat", ["cat", "pet"])
    assert xmp_fields(" plain caption ", {"caption": "plain caption"}) == ("plain caption", [])
    ask = {"answers": [{"json": {"description": "d", "objects": ["x"]}}]}
    assert xmp_fields("", ask) == ("d", ["x"])


def test_an_existing_xmp_is_merged_only_with_overwrite(tmp_path: Path) -> None:
    image = tmp_path / "photo.jpg"
    image.write_bytes(b"")
    (tmp_path / "photo.xmp").write_text(DARKTABLE)
    sidecars = Sidecars(form="xmp")
    assert sidecars.blocks(str(image))
    assert "exists" in (sidecars.write(str(image), "new", {"json": {"tags": ["dog"]}}) or "")
    assert Sidecars(overwrite=True, form="xmp").write(str(image), "new caption", {"json": {"tags": ["dog"]}}) is None
    alt, bag, _ = _read((tmp_path / "photo.xmp").read_bytes())
    assert bag == ["holiday", "cat", "dog"] and alt["de"] == "alte Beschreibung"
    (tmp_path / "bad.jpg").write_bytes(b"")
    (tmp_path / "bad.xmp").write_text("<not-xmp/>")
    problem = Sidecars(overwrite=True, form="xmp").write(str(tmp_path / "bad.jpg"), "x")
    assert problem is not None and "not XMP" in problem


def test_caption_a_folder_into_xmp_sidecars(smolvlm2_gguf, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(SAMPLE.read_bytes())
    schema = {
        "type": "object",
        "properties": {
            "caption": {"type": "string", "minLength": 3},
            "tags": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": 8},
                "minItems": 1,
                "maxItems": 2,
            },
        },
        "required": ["caption", "tags"],
    }
    args = [sys.executable, "-m", "vlmcli", "caption", str(photos), "--model", str(smolvlm2_gguf.model)]
    args += ["--mmproj", str(smolvlm2_gguf.mmproj), "--json-schema", json.dumps(schema), "-n", "48", "--temp", "1"]
    r = subprocess.run([*args, "--sidecar", "xmp"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    alt, bag, _ = _read((photos / "a.xmp").read_bytes())
    assert "x-default" in alt and 1 <= len(bag) <= 2 and all(bag)
    assert not (photos / "a.txt").exists()
    again = subprocess.run([*args, "--sidecar", "xmp"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 done, 1 skipped" in again.stderr
