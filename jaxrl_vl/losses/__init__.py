"""Pure-JAX losses: SFT cross-entropy (plain, chunked, and fused with its gradient), policy losses, Tinker's loss_fns,
advantage estimators, KL estimators, aggregation modes; each selectable by name (registry.py)."""
from jaxrl_vl.losses import advantages, aggregate, kl, policy, sft, tinker_losses  # registers all
from jaxrl_vl.losses.advantages import (compute_advantages, filter_zero_variance_groups,
                                        token_advantages, zero_variance_groups)
from jaxrl_vl.losses.aggregate import aggregate as aggregate_loss
from jaxrl_vl.losses.fused_nll import chunked_weighted_nll
from jaxrl_vl.losses.kl import kl_penalized_rewards
from jaxrl_vl.losses.policy import PolicyLossConfig, compute_policy_loss
from jaxrl_vl.losses.registry import (get_advantage, get_aggregation, get_kl_estimator,
                                      get_policy_loss, get_tinker_loss)
from jaxrl_vl.losses.sft import chunked_token_logprobs, cross_entropy_loss, token_logprobs
from jaxrl_vl.losses.tinker_losses import resolve_loss_fn_config, tinker_loss
