"""Helpers of the QLoRA course: ``common`` for what every chapter shares, and one package per chapter.

==================  ================================================================================
package             chapter
==================  ================================================================================
``common``          assets, device and dtype, result files, the papermill runner, widgets, model shapes
``ch01_memory``     01 memory math: the estimator, the GPU table, measuring on a GPU
``ch02_tad``        02 quantized adapters for temporal action detection
``ch03_sft``        03 supervised fine-tuning: data, the four modes, the ``sft`` command and its levers
``ch04_vlm``        04 vision-language models in 8 GB: configs, VRAM plans, a small LLaVA, the ``vlm`` command
``ch05_multi_gpu``  05 data-parallel QLoRA from a notebook: each rank runs the ``sft`` command; precision, plateau rule
==================  ================================================================================

A notebook imports from its own chapter's package; a chapter imports only ``common`` and earlier chapters.
"""

__version__ = "0.1.0"

from qlora_helpers.library_messages import install as _drop_known_library_messages  # noqa: E402

_drop_known_library_messages()
