"""The deploy-bundle contract shared by ``export`` (writer) and ``serving`` (reader).

A bundle is a directory::

    manifest.json                 # this module documents its keys
    image_encoder.onnx            # pixel_values float32 [B,3,H,W] -> image_embeds float32 [B,D], L2-normalised
    text_encoder.onnx             # input_ids int64 [N,L] -> text_embeds float32 [N,D], L2-normalised
                                  #   (one file per prompt set: text_encoder_<k>.onnx when a method has several)
    class_embeddings.safetensors  # key "class_embeddings": [C, D] float32 (one key per prompt set:
                                  #   "class_embeddings_<k>"), row order = manifest["classes"]["names"]
    bpe_simple_vocab_16e6.txt.gz  # the CLIP BPE vocabulary the tokenizer reads

manifest.json keys (format_version 1)::

    format: "promptclip.bundle"
    format_version: int            # readers refuse a bundle whose min_reader_version > READER_VERSION
    min_reader_version: int
    created_by: {promptclip, torch, open_clip, onnx, ...}  versions, informative
    method: {name, config: {...}, capabilities: {text_depends_on_image, num_prompt_sets,
             class_bound, finetuned_image_tower}}
    backbone: {name, pretrained, weights_sha256}
    embedding_dim: int
    logit_scale: float             # multiply cosine similarities by this to get logits
    preprocessing: {image_size: [H, W], resize_mode: "shortest"|"longest"|"squash",
                    interpolation: "bicubic"|"bilinear"|"nearest", mean: [3], std: [3], fill_color: int}
    text: {tokenizer: "clip-bpe", vocab_file, vocab_sha256, context_length: int,
           templates: [str, ...]  (one per prompt set, "{}" marks the class name),
           max_name_tokens: int}
    classes: {names: [...], file: "class_embeddings.safetensors", sha256}
    graphs: {image: GraphSpec, text: [GraphSpec, ...]}
        GraphSpec = {file, sha256, opset, exporter, inputs: [{name, dtype, shape}], outputs: [...]}
    engines: [{graph, file, tensorrt_version, compute_capability, precision}]   (host-specific cache)
    parity: {image: {...}, text: {...}}   measured ORT-vs-torch figures written by export

Format 2 (several prompt sets, e.g. GuiDG's domain experts; single-set bundles are still written as format 1)::

    format_version: 2, min_reader_version: 2
    method.capabilities.num_prompt_sets: S > 1
    prompt_sets: {names: [S names, e.g. the source domains], combine: "weighted_sum"}
    graphs.image outputs: image_embeds [B, D] and expert_weights float32 [B, S] (per image, each row a
        distribution over the prompt sets; it never depends on the other images of a batch)
    graphs.text: S graph specs (text_encoder_<k>.onnx), text.templates: S templates
    class_embeddings.safetensors: "class_embeddings_<k>" [C, D] for k = 0..S-1

    logits[b, c] = logit_scale * sum_k expert_weights[b, k] * (image_embeds[b] . class_embeddings_k[c])

A class added at runtime is encoded by every prompt set's text graph; the expert weights depend on the image only
(the weighting head's keys are fixed at export), so a runtime class is scored exactly like an exported one.
"""
from __future__ import annotations

BUNDLE_FORMAT = "promptclip.bundle"
#: Version this code writes for single-prompt-set bundles (readable by every reader).
BUNDLE_FORMAT_VERSION = 1
#: Version this code writes for bundles with several prompt sets (``prompt_sets`` + ``expert_weights``).
MULTI_SET_FORMAT_VERSION = 2
#: Newest ``min_reader_version`` this reader understands.
READER_VERSION = 2

MANIFEST_FILE = "manifest.json"
CLASS_EMBEDDINGS_FILE = "class_embeddings.safetensors"
IMAGE_GRAPH_FILE = "image_encoder.onnx"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

IMAGE_INPUT = "pixel_values"
IMAGE_OUTPUT = "image_embeds"
TEXT_INPUT = "input_ids"
TEXT_OUTPUT = "text_embeds"
#: Second image-graph output of multi-set bundles: float32 [B, S] per-image weights of the prompt sets.
EXPERT_WEIGHTS_OUTPUT = "expert_weights"
#: The only ``prompt_sets.combine`` rule (see the module docstring).
COMBINE_WEIGHTED_SUM = "weighted_sum"

#: Keys a format-1 manifest may hold at top level; readers warn once on others.
KNOWN_MANIFEST_KEYS = frozenset({
    "format", "format_version", "min_reader_version", "created_by", "method", "backbone",
    "embedding_dim", "logit_scale", "preprocessing", "text", "classes", "graphs", "engines", "parity",
    "prompt_sets",
})


def text_graph_file(prompt_set: int, num_prompt_sets: int) -> str:
    """File name of the text graph of ``prompt_set``."""
    return "text_encoder.onnx" if num_prompt_sets == 1 else f"text_encoder_{prompt_set}.onnx"


def class_embeddings_key(prompt_set: int, num_prompt_sets: int) -> str:
    """Key of ``prompt_set``'s class embeddings inside ``class_embeddings.safetensors``."""
    return "class_embeddings" if num_prompt_sets == 1 else f"class_embeddings_{prompt_set}"


# -- class names -------------------------------------------------------------------------------------------------
# The one class-name rule, used by the dataset readers (folder and split-file names), export (the bundle's class
# list) and the service (classes added at runtime), so that a class gets the same text whichever way it arrives.


def canonical_class_name(raw: str) -> str:
    """The canonical text of a class name: underscores become spaces, surrounding whitespace is stripped and runs
    of whitespace collapse to one space. Case is kept as written (it is what users see back).

    ``"golden_retriever"``, ``" golden  retriever "`` and ``"golden retriever"`` are one class. Validation (empty
    names, control characters, length) is the caller's: this function only rewrites.
    """
    return " ".join(str(raw).replace("_", " ").split())


def class_name_key(name: str) -> str:
    """Identity of a class name for duplicate checks: its canonical text, case-folded.

    CLIP's tokenizer lowercases its input, so ``"Golden Retriever"`` and ``"golden retriever"`` get the same
    embedding: a name whose key matches an exported class reuses that class's embedding row. The class list itself
    keeps names that differ only in case apart (the registry warns when one is added).
    """
    return canonical_class_name(name).casefold()
