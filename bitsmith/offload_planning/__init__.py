"""Attention-offloading (Lamina) planning: a roofline cost model over the IR, device and link
presets as data, and a planner comparing offloaded and homogeneous deployments
(``bitsmith plan-offload``; docs/offload-planning.md). Imports no backend."""
