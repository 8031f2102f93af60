"""Chat data with images -> rendered examples -> padded/packed batches through a grain pipeline.

    records = sources.read_jsonl(path)          # or image_folder_records / hf_disk_records
    renderer = HFRenderer.from_pretrained(model_dir)   # or VLLMRenderer(url, name, model_dir)
    examples = render_records(records, renderer, max_length=256, on_bad_record="skip")
    collate = batching.make_collate_fn(model_config, max_length=256, image_mean=renderer.image_mean,
                                       image_std=renderer.image_std, pad_id=renderer.pad_token_id)
    it = iter(make_dataset(examples, PipelineSpec(batch_size=8, max_length=256), collate))

Modules: sources (datasets -> records), images (image references), validation (bad records),
render / render_vllm (Renderer implementations), masks (assistant and image spans), batching
(truncation, buckets, packing, collate), pipeline (grain), digits (offline demo data).
"""

from jaxrl_vl.data import batching, sources
from jaxrl_vl.data.pipeline import PipelineSpec, host_spec, make_dataset, render_records
from jaxrl_vl.data.render import HFRenderer, RenderedExample, Renderer, normalize_pixels, render_record
from jaxrl_vl.data.validation import BadRecordError, DataReport

__all__ = ["BadRecordError", "DataReport", "HFRenderer", "PipelineSpec", "RenderedExample", "Renderer", "batching",
           "host_spec", "make_dataset", "normalize_pixels", "render_record", "render_records", "sources"]
