"""The library the backbone families share; not a family (it registers nothing).

checkpoint IO (`checkpoint`), dataset statistics and BOUNDS_Q99 normalisation (`statistics`), the Llama
tokenizer and the shipped tiny one (`tokenizer`, `assets/`), the fused DINOv2 + SigLIP towers (`vision`), the
OpenVLA config.json (`config`), the Prismatic VLM (`vlm`), the base class and preprocessing of the backbones built
on it (`prismatic`), and what the random-weight presets share (`tiny`). A family imports from here, never from
another family's folder.
"""
