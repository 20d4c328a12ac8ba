"""The shared half of every backend: views, result cache, batching, stacking, nulls.

:class:`~sway_common.backend.model_views.ModelViews` owns a framework's
:class:`~sway_common.backend.runtime.Runtime` and everything built around it; see
docs/architecture.md for the path of one call.
"""
