"""The photo index: CLIP vectors (and captions) of image files in one SQLite database, searched exactly
with numpy. Pure Python + numpy + sqlite3: it loads no model (whatever encodes queries is passed in)
and imports nothing above vlmcli.errors / vlmcli.files.

    db.py      IndexDB: the schema, files keyed by path (size, mtime, SHA-256), vectors by content + model
    search.py  queries ("dog" + "beach" - "night", images), exact cosine ranking, folder / time filters
    dupes.py   near-duplicate groups with pair scores and a suggested keeper
    web.py     a small page on 127.0.0.1: query box, thumbnails, duplicate groups
"""
