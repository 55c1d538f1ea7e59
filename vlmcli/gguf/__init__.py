"""GGUF files in pure Python: reading headers, the validation rules, and the tensor layout of each model.

Used by the converters (vlmcli.convert), the store and the engines' loaders; imports nothing of vlmcli
but errors, so any layer may use it. Each module imports only those above it:

    reader, layout, ggml_types, limits
    clip_layout, smolvlm2_layout        (layout, ggml_types)
    rule_kinds                          (reader, layout)
    relations                           (rule_kinds, smolvlm2_layout, limits)
    rules                               (relations, rule_kinds, limits, reader)
    validate                            (rules, reader)

- reader.py         the header: key/values and tensor infos (inspect_gguf: read and classify a file)
- layout.py         GgufTensor: one tensor of a layout (GGUF name, Hugging Face name, shape, types)
- ggml_types.py     the sets of ggml tensor types loaders accept
- clip_layout.py    vlm's two-tower CLIP file
- smolvlm2_layout.py  SmolVLM2's language model (llama) and vision projector (idefics3)
- rule_kinds.py     the kinds of rule (Key, Relation, Tensors), the Model they check, InvalidModelValue
- relations.py      the checks across keys and the tensor lists the table names; limits.py the bounds
- rules.py          the validation table (types, ranges, relations, tensor shapes)
- validate.py       require_kind: read, check the kind, apply the table
"""
