"""Open-vocabulary 3D instances without 3D-trained proposal weights (SAS 4.4, MOSS, MaskClustering).

* :mod:`~sas_core.instances.masks`: 2D masks back-projected onto superpoints (fusion's visibility rule);
* :mod:`~sas_core.instances.clustering`: view-consensus mask clustering, the region-growing fallback,
  the same-label connected-components baseline;
* :mod:`~sas_core.instances.base`: the :class:`Instance` container, boxes, instance semantics;
* :mod:`~sas_core.instances.query`: object-level text queries on a voxel map;
* :mod:`~sas_core.instances.pipeline`: :func:`propose_instances`, the one entry point.
"""

from sas_core.instances.base import (  # noqa: F401
    Instance,
    describe_instances,
    group_boxes,
    instance_ids,
    mean_features,
    oriented_box,
    score_instances,
)
from sas_core.instances.clustering import (  # noqa: F401
    InstanceConfig,
    cluster_masks,
    label_components,
    region_growing,
    superpoint_adjacency,
)
from sas_core.instances.masks import (  # noqa: F401
    BackProjection,
    BackProjectionConfig,
    MaskView,
    SamMaskSource,
    backproject_masks,
    frame_instance_masks,
)
from sas_core.instances.pipeline import cloud_instances, instances_json, mask_views, propose_instances  # noqa: F401
from sas_core.instances.query import grid_components, instances_for_query  # noqa: F401
