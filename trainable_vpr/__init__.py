"""The training core of the VPR suite: what the product names, nothing else.

One small module per piece (import this package as `vpr`; every public name is here):
- backbones: frozen backbones (BACKBONES registry, create_backbone / create_pooled_backbone;
  where the weights come from: trainable_vpr/weights.py)
- heads: HeadConfig, the HEADS registry, build_head, embed
- losses: in-batch pairs and HybridLoss (per-item losses; the miners share one contract in
  trainable_vpr/miners.py)
- mining: GPS and label mining over the data set (mine_hard_negatives, make_place_batches)
- data: the splits a training run loads, checks and describes (Split, TrainingData)
- config: TrainConfig (stored in every checkpoint) and the configs of the scripts that apply a
  model (EvalConfig, LocalizeConfig, ExperimentConfig, TuneConfig), each with its checks
- starts: where the residual head starts (raw, PCA- or learned whitening; --pooling auto: and
  which pooling), chosen on validation
- checkpoints: the one home of checkpoints (paths, payload, save, load, rebuild)
- model: PlaceDescriptor, the whole descriptor as one nn.Module (preprocessing, frozen backbone,
  pooling, head), and describe_table (a table's descriptors through the feature cache)
- sequence_model: SequenceDescriptor, the sequence model (frame part + sequence head + matching
  settings + fusion weight) over windows of frames; seqnet / sequence_training / fusion: its head,
  its training over cached frame descriptors, fusion with matching (imported as modules)
- miners (in-batch miners, the UCB bandit), vocabulary (the VLAD vocabulary, fitted once),
  weights and hub (where backbone weights come from): pieces only the core uses
- training (the loop: train(config) -> TrainResult) and runs (a run's state, start, optimiser,
  checkpoints, resume): imported as modules, not named here (they build on this package)

The support code (the command-line shell, tables, the pair rule, features and cache, retrieval
metrics, logs) lives in the vprkit package's wings beside it; docs/DESIGN.md says where each idea lives.
Dependencies run one way: vprkit <- trainable_vpr <- scripts.
"""
from trainable_vpr.backbones import (  # noqa: F401
    BackboneSpec,
    BACKBONES,
    OFFLINE_BACKBONES,
    TIMM_PREFIX,
    Backbone,
    create_backbone,
    pool_backbone,
    create_pooled_backbone,
    with_pooling,
    backbone_descriptor,
    DEFAULT_LOCAL_FEATURES_PER_IMAGE,
    local_backbone,
    local_features_line,
)
from trainable_vpr.heads import (  # noqa: F401
    PROJECTION_HIDDEN_MAX,
    ProjectionHead,
    ResidualHead,
    MLPHead,
    NetVLADHead,
    NETVLAD_ASSIGNMENT_SCALE,
    LOCAL_HEADS,
    HeadConfig,
    HEADS,
    build_head,
    check_input_dim,
    embed,
)
from trainable_vpr.losses import (  # noqa: F401
    batch_pair_masks,
    select_positives_by_feature,
    LossParts,
    LOSS_DISTANCES,
    HybridLoss,
)
from trainable_vpr.mining import (  # noqa: F401
    mine_hard_negatives,
    hard_negative_places,
    make_place_batches,
)
from trainable_vpr.config import (  # noqa: F401
    SUPERVISIONS,
    HEAD_STARTS,
    POOLING_AUTO,
    NEG_SAMPLERS,
    DEFAULT_MODEL,
    TrainConfig,
    ModelSource,
    EvalConfig,
    LocalizeConfig,
    ExportConfig,
    ExperimentConfig,
    TuneConfig,
    validate_train_config,
    effective_hard_neg_ratio,
    set_determinism,
)
from trainable_vpr.starts import (  # noqa: F401
    START_NAMES,
    POOLING_CANDIDATES,
    FitData,
    HeadStart,
    PoolingChoice,
    StartChoice,
    choose_pooling,
    choose_start,
    pooling_candidate,
    start_head,
)
from trainable_vpr.checkpoints import (  # noqa: F401
    checkpoint_backbone,
    head_from_checkpoint,
    load_checkpoint,
)
