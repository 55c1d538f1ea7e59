"""`vlm eval`: quality and speed on the user's machine, through the same tasks, runner and executors.

    vqa.py        evaluate_vqa: VqaTask, each image's questions from one encoding; score_vqa_predictions
    captions.py   evaluate_captions: CaptionTask; CIDEr-D, BLEU-1..4, ROUGE-L; score_caption_predictions
    zeroshot.py   evaluate_zeroshot: ClassifyTask (ZeroShotTask) over class names x templates; top-1 / top-5
    retrieval.py  evaluate_retrieval: EmbedImagesTask + EmbedTextsTask; Recall@1/5/10 both ways
    runs.py       EvalSettings; one executor per model spec (here or on Ray), best-of rows, a row's model fields
    report.py     the report dict: speed, the machine, summaries, the best-of scaling fit
    records.py    the runs' records: in memory or in --out, read back per identity; predictions files
    data.py       the datasets (VQAv2, COCO captions, Karpathy, ImageFolder, JSONL); imagenet.py CLIP's prompts

Each model spec (several give a side-by-side table) gets an executor (runs.model_runs), is run over
every item (per-item records in `settings.out`, resumable), scored with vlmcli.metrics, and reported
with its speed. The report is a plain dict (JSON-ready); front ends render it.
"""
