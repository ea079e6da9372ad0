"""The Hub side of a quantized checkpoint: repo ids (repo.py), the model card (card.py), uploads (push.py)."""

from .card import (
                   CARD_NAME,
                   COMPARISON_PNG,
                   CONFLICT_PNG,
                   REPO_ID_PLACEHOLDER,
                   SAMPLE_WEIGHTS_PNG,
                   build_model_card,
                   card_for_pipeline_top,
                   copy_card_to_pipeline_top,
                   card_for_repo,
                   write_model_card,
)
from .push import (
                   DEFAULT_PUSH_TIMEOUT,
                   PUSH_TIMEOUT_ENV,
                   HubPushError,
                   UploadFile,
                   hub_client_timeout,
                   push_folder,
                   push_quantized,
                   push_timeout,
)
from .repo import REFERENCE_BASE_MODEL, check_repo_id, is_hub_id, public_base_model

__all__ = ["CARD_NAME", "COMPARISON_PNG", "CONFLICT_PNG", "DEFAULT_PUSH_TIMEOUT", "PUSH_TIMEOUT_ENV", "REFERENCE_BASE_MODEL",
           "REPO_ID_PLACEHOLDER", "SAMPLE_WEIGHTS_PNG", "HubPushError", "UploadFile", "build_model_card", "card_for_pipeline_top", "card_for_repo",
           "copy_card_to_pipeline_top",
           "check_repo_id", "hub_client_timeout", "is_hub_id", "public_base_model", "push_folder", "push_quantized",
           "push_timeout", "write_model_card"]
