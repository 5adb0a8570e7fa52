"""One config tree for every raymia run: dataclasses <-> YAML presets.

A preset is a YAML file in ``raymia/presets`` (``orl`` is the default).  A preset
may name another preset under ``extends:`` and then only lists what differs.
Command-line overrides use dotted keys: ``--set target.epochs=3``.  Unknown keys
anywhere (preset, override, saved config) raise :class:`ConfigError` naming the
key and the keys that are valid at that level.

(~600 lines: the whole dataclass tree sits in one module on purpose, so that every
section, its defaults and its checks read top-down in one place.)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

# Allowed values, declared once: the fields below are annotated with these Literals and
# the coercion (:func:`_coerce`) refuses anything else, naming the key and the choices.
DataName = Literal["orl", "mnist5k", "digits", "imagefolder", "celeba", "mnist"]
Arch = Literal["faceresnet", "smallcnn", "lenet5"]
DummyVariant = Literal["paper", "calibrated"]
AnchorChoice = Literal["random", "far"]
Rule = Literal["linear", "gated"]
# the α sweep's / defense check's attackers (raymia.sweep.attack_chunk): white-box generator MIA,
# the same with expectation over transformation, black-box NES on scores, label-only
SweepAttack = Literal["whitebox", "eot", "nes", "label"]
CompileMode = Literal["off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"]
DUMMY_VARIANTS = get_args(DummyVariant)
SWEEP_ATTACKS = get_args(SweepAttack)


class ConfigError(ValueError):
    """A config key or value that raymia cannot use; the message says which."""


@dataclass
class RunCfg:
    name: str = "orl"            # results go to <out_root>/<name>/
    seed: int = 0
    device: str = "auto"         # auto | cpu | cuda | cuda:N
    out_root: str = "runs"
    threads: int = 0             # torch threads per process; 0 = leave as is


@dataclass
class DataCfg:
    name: DataName = "orl"
    root: Optional[str] = None   # local path for user data sets (never downloaded)
    image_size: int = 32
    private_ids: int = 20        # identities of the victim R_T (private set D)
    train_per_id: int = 7        # R_T's training images per identity
    test_per_id: int = 3         # R_T's held-out images per identity
    eval_ids: int = 0            # identities of the evaluator R_E; 0 = all
    eval_test_per_id: int = 3    # R_E's held-out images per identity
    aux_lfw: bool = True         # add skimage's 100 LFW faces to the attacker's auxiliary set
    max_per_id: int = 0          # cap images per identity for large folders (0 = all)
    celeba_target: Literal["identity", "attr"] = "identity"
    celeba_attrs: list = field(default_factory=lambda: ["Male", "Smiling"])
    split_seed: int = 0
    fold: int = 0                # identity fold: rotates the shuffled identities by fold x private_ids
    eval_shared_ids: int = 0     # R_T identities R_E also knows (the first ones; targets); 0 = all
    max_ids: int = 0             # imagefolder: read only the first N identity folders (sorted; 0 = all)
    aux_name: Literal["", "celeba", "imagefolder"] = ""   # attacker's auxiliary set from elsewhere ("" = default split)
    aux_root: Optional[str] = None   # local path of that set (never downloaded)
    aux_max: int = 0             # cap on auxiliary images read (0 = all)


@dataclass
class ClassifierCfg:
    arch: Arch = "faceresnet"
    width: int = 32
    blocks: list = field(default_factory=lambda: [1, 1, 1])
    embed_dim: int = 128
    loss: Literal["cosface", "ce"] = "cosface"
    cos_s: float = 16.0
    cos_m: float = 0.2
    epochs: int = 60
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 5e-4
    augment: bool = True
    dropout: float = 0.0
    stem: Literal["cifar", "imagenet"] = "cifar"   # faceresnet stem: cifar (3x3 s1) | imagenet (7x7 s2 + max-pool)
    adv_eps: float = 0.0         # adversarial training (Madry et al.'s PGD, L2 ball in pixel units); 0 = off
    adv_steps: int = 5           # PGD steps per batch
    adv_step: float = 0.0        # PGD step length; 0 = 2.5 * adv_eps / adv_steps


@dataclass
class GanCfg:
    latent_dim: int = 64
    ngf: int = 32
    ndf: int = 32
    iters: int = 1500
    batch_size: int = 32
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    diffaug: str = "color,translation,cutout"   # DiffAugment policy ("" = off)
    mbd_features: int = 16       # minibatch discrimination: B (0 = off)
    mbd_kernel: int = 8          # minibatch discrimination: C
    bn_calib_batches: int = 20   # batches used to re-estimate G's BatchNorm statistics


@dataclass
class DummyCfg:
    variant: DummyVariant = "paper"
    sigma2: float = 1.0          # z_i ~ N(0, sigma2 I)
    sigma_tilde2: float = 0.0625 # z_il ~ N(z_i, sigma_tilde2 I)
    m: int = 50                  # neighbours per anchor
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    calib_weight: float = 1.0    # weight of the uniform-on-real-faces term (calibrated only)
    anchors_per_class: int = 1   # beyond the paper: k anchors (each with m neighbours) per class
    anchor_choice: AnchorChoice = "random"  # random (paper) | far: from a pool, the anchors least similar to any
                                   # real training face in R_T's feature space
    anchor_pool: int = 8         # far: candidates drawn per anchor kept
    draw: int = 0                # independent draw of R_dmy (anchors + training seed): 0 selects, 1 reports


@dataclass
class SearchCfg:
    """Defense search (jobs/defense_search.py): Tune search space, budget and final check."""
    num_samples: int = 12            # Tune trials (defense configurations) to try
    max_concurrent: int = 0          # 0 = as many as the cluster's CPUs/GPUs allow
    alphas: list = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1])
    searcher: Literal["optuna", "random"] = "optuna"   # optuna (TPE) | random
    # search space: [low, high] ranges (log scale for the *_log ranges) and choices
    sigma_tilde2_log: list = field(default_factory=lambda: [0.02, 0.5])
    sigma2: list = field(default_factory=lambda: [0.5, 1.5])
    m: list = field(default_factory=lambda: [20, 100])
    calib_weight_log: list = field(default_factory=lambda: [0.1, 10.0])
    epochs: list = field(default_factory=lambda: [5, 20])
    anchors_per_class: list = field(default_factory=lambda: [1, 3])
    anchor_choices: list[AnchorChoice] = field(default_factory=lambda: ["random", "far"])
    rules: list[Rule] = field(default_factory=lambda: ["linear", "gated"])
    gate_tau: list = field(default_factory=lambda: [0.2, 0.8])
    # final check of the recommended defense and the baselines
    seeds: list = field(default_factory=lambda: [1, 2, 3])   # disjoint from run.seed (the search's own seed)
    eot_samples: int = 4             # adaptive attacker: transforms averaged per step
    eot_shift: int = 2               # adaptive attacker: max shift in pixels
    eot_noise: float = 0.03          # adaptive attacker: Gaussian noise std
    # the check's attackers (the sweep's attack dimension): whitebox must be one of them (the deployed
    # alpha is chosen against it); eot is the adaptive attacker; nes / label the query attacks
    check_attacks: list[SweepAttack] = field(default_factory=lambda: ["whitebox", "eot"])


@dataclass
class CombineCfg:
    """How the released model mixes R_T and R_dmy (not part of R_dmy's training)."""
    rule: Rule = "linear"        # linear: Eq. 1 | gated: dummy weight (1-alpha)*sigmoid((max R_dmy - tau)/temp)
    gate_tau: float = 0.5        # gated: R_dmy top confidence at which the gate is half open
    gate_temp: float = 0.05      # gated: gate softness


@dataclass
class AttackCfg:
    iters: int = 300
    lr: float = 0.05
    restarts: int = 3
    targets: list = field(default_factory=list)   # empty = every R_T identity
    latent_bound: float = 3.0    # latent kept in [-b, b] (prior's range)
    restart_offset: int = 0      # first restart index (the report draw uses restarts the selection never ran)
    batch_rows: int = 256        # (target, restart, alpha) rows per attack call
    fredrikson_iters: int = 200
    fredrikson_lr: float = 0.1
    # fast path of the generator MIA (raymia.attacks.generator_mia.FastPath); defaults are
    # the exact fp32 reference, safe on CPU.  GPU presets turn these on.
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: autocast; softmax/loss and the latent stay fp32
    channels_last: bool = False  # NHWC memory format for the frozen nets' convolutions
    fold_bn: bool = False        # fold eval-mode BatchNorm into the preceding conv/linear (on a copy)
    compile: CompileMode = "off"
    pad_channels: bool = False   # pad the image's channels to 8 (zero weights): tensor-core kernels for the stem


@dataclass
class WhiteBoxCfg:
    """The white-box attack panel (``make whitebox-panel``, :mod:`raymia.pipelines.whitebox_panel`):
    the attack's options (:class:`raymia.attacks.whitebox.WhiteBoxOpts`), its prior, and the
    panel of attempts, each a name and the overrides that make it (any config key: a victim
    trained otherwise is ``target.*``)."""
    prior: Literal["gan", "linear", "mixed", "pixel"] = "gan"   # gan: attacker's F; linear: eigenfaces of the aux set
    components: int = 100         # linear / mixed: eigenface components
    mixed_weight: float = 0.5     # mixed: weight of the linear residual
    iters: int = 300
    lr: float = 0.05
    bound: float = 3.0
    tv_weight: float = 0.0
    norm_weight: float = 0.0
    aug_samples: int = 0
    aug_shift: float = 2.0
    aug_flip: bool = True
    aug_noise: float = 0.02
    select_samples: int = 16
    restarts: int = 3             # per target and draw
    targets: list = field(default_factory=list)   # empty = every identity R_E knows
    project_iters: int = 300      # ceiling: Adam steps projecting the targets' photos into each prior
    panel: dict = field(default_factory=lambda: {
        "F (the alpha sweep's attack)": [],
        "F, 1500 iterations": ["whitebox.iters=1500"],
        "F + total variation + latent norm": ["whitebox.tv_weight=0.3", "whitebox.norm_weight=0.1"],
        "F + augmentation in the loss (4)": ["whitebox.aug_samples=4"],
        "pixels + total variation": ["whitebox.prior=pixel", "whitebox.tv_weight=0.3"],
        "eigenfaces 50": ["whitebox.prior=linear", "whitebox.components=50"],
        "eigenfaces 100": ["whitebox.prior=linear"],
        "eigenfaces 200": ["whitebox.prior=linear", "whitebox.components=200"],
        "eigenfaces 100 + TV + augmentation (4)": ["whitebox.prior=linear", "whitebox.tv_weight=0.3",
                                                    "whitebox.aug_samples=4"],
        "F + eigenface residual": ["whitebox.prior=mixed"],
        "victim with margin 0.4: F": ["target.cos_m=0.4"],
        "victim with margin 0.4: eigenfaces 100": ["target.cos_m=0.4", "whitebox.prior=linear"],
        "adversarially trained victim (L2 0.5): F": ["target.adv_eps=0.5"],
        "adversarially trained victim (L2 0.5): eigenfaces 100": ["target.adv_eps=0.5", "whitebox.prior=linear"],
        "adversarially trained victim (L2 1): F": ["target.adv_eps=1.0"],
        "adversarially trained victim (L2 1): eigenfaces 100": ["target.adv_eps=1.0", "whitebox.prior=linear"],
    })
    report_draw: bool = True      # the best attempt on the selection draw is run again on fresh restarts


@dataclass
class QueryAttackCfg:
    """Query-based attacks through an oracle (raymia/attacks/blackbox.py, label_only.py)."""
    budget: int = 2000           # black-box (NES): queries per row
    nes_pairs: int = 10          # antithetic pairs per iteration (2x queries)
    nes_sigma: float = 0.1       # perturbation std in latent units
    nes_lr: float = 0.05         # Adam step on the estimated gradient
    top_k: int = 0               # confidences the black-box attacker gets back (0 = all)
    label_budget: int = 3000     # label-only: queries per row
    label_points: int = 24       # sphere points per round
    label_r0: float = 1.0        # first sphere radius (latent units)
    label_growth: float = 1.2    # radius factor when the whole sphere is labelled the target
    label_r_max: float = 8.0     # stop at this radius
    label_step: float = 0.5      # step (fraction of the radius) away from the points not labelled the target
    label_init_batch: int = 64   # prior draws per round while looking for a start labelled the target
    label_init_budget: int = 2000  # most queries spent looking for that start
    # in-process black-box attacks: an iteration's queries in forwards of at most this many images
    # (0 = all in one forward); on the 2-core CPU pieces of 64 ran 3.7x faster than one forward of
    # 800 (docs/benchmarks.md, "Query attacks"); same queries, order and counts
    forward_batch: int = 64


@dataclass
class SweepCfg:
    alpha_start: float = 0.0
    alpha_stop: float = 1.0
    alpha_step: float = 0.05
    alphas: list = field(default_factory=list)    # explicit grid overrides start/stop/step
    variants: list[DummyVariant] = field(default_factory=lambda: ["paper", "calibrated"])
    # the attack dimension: every (variant, α, target, restart) row is attacked by each of these
    # (paired: same targets, restarts and row seeds); α is selected on the FIRST one's R_E success
    attacks: list[SweepAttack] = field(default_factory=lambda: ["whitebox"])
    grid_alphas: list = field(default_factory=lambda: [1.0, 0.7, 0.5, 0.25, 0.1])
    bootstrap: int = 1000
    accuracy_tolerance: float = 0.01
    # how an alpha qualifies (evaluation.admissible): "point" = accuracy >= R_T - tolerance;
    # "ci" = or the drop's paired 95% bootstrap CI over the test images reaches down to the tolerance
    accuracy_rule: Literal["point", "ci"] = "ci"
    report_draw: bool = True     # report the selected alpha on a fresh draw (new R_dmy seed and new restarts)


@dataclass
class StudyCfg:
    """The study (raymia.pipelines.study): the α sweep repeated over seeds x identity folds."""
    seeds: list = field(default_factory=lambda: [0, 1])
    folds: list = field(default_factory=lambda: [0, 1])   # ORL: 2 folds of 20 targets = all 40 identities


@dataclass
class JudgeCfg:
    """Judges of reconstructions beside R_E (raymia.judges); the attacker never sees them."""
    names: list[Literal["external", "classical"]] = field(default_factory=lambda: ["external", "classical"])
    external_size: int = 150          # dlib face descriptor input side (reconstructions are upsampled)
    classical_components: int = 60    # eigenfaces: PCA components (whitened)
    classical_c: float = 10.0         # RBF SVM's C


@dataclass
class ResourcesCfg:
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.25       # used only when GPUs exist
    attack_workers: int = 0            # 0 = one per GPU, or 1 on CPU
    use_gpu: Literal["auto", "always", "never"] = "auto"   # auto: if the cluster has GPUs now; always: autoscaling, ask for them
    object_store_mb: int = 256


@dataclass
class ServeCfg:
    """The Ray Serve app (serve/): what it serves, the filter state, HTTP limits, batching."""
    variant: Literal["auto", "paper", "calibrated"] = "auto"   # auto: lowest MIA success in recommendation.json
    alpha: Optional[float] = None  # null = the alpha sweep's recommended alpha for the variant
    recommendation: str = ""       # "" = <out_root>/<run.name>/alpha_sweep/recommendation.json
    model: Literal["combined", "target"] = "combined"   # combined: R', defended; target: R_T alone (benchmarks)
    use_filter: bool = True        # per-client similarity filter (section filter) in front of the model
    state_in: Literal["replica", "actors"] = "replica"   # replica: each replica holds the store (no actor hop); actors: shard actors hold it
    shards: int = 2                # filter-state actors (state_in: actors); clients are sharded by id
    state_path: str = ""           # SQLite file of the filter states; "" = <out_root>/<run.name>/serve/filter_state.sqlite
    state_url: str = ""            # postgresql://user@host:5432/db: the filter states in PostgreSQL (apps on several nodes); "" = SQLite at state_path
    max_body_bytes: int = 1048576  # larger request bodies get 413
    top_k: int = 5                 # most confidences one reply carries (a request may ask for fewer)
    labels_only: bool = False      # replies carry the label only, no confidences
    api_keys_file: str = ""        # YAML/JSON {api_key: client_id}; "" = clients name themselves (X-Client-Id)
    admin_token_env: str = "RAYMIA_ADMIN_TOKEN"   # env var with the admin token; unset = admin endpoints off
    batch_size: int = 16           # @serve.batch max_batch_size
    batch_wait_ms: float = 2.0     # @serve.batch batch_wait_timeout_s, in ms
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    torch_threads: int = 1         # torch threads per replica (0 = leave as is)
    fold_bn: bool = True           # fold BatchNorm into the preceding layers for inference (same outputs up to rounding)
    max_ongoing_requests: int = 64 # per replica
    shard_timeout_s: float = 10.0  # deadline of one filter-shard call (retries included); past it: 503, fail closed
    health_interval_s: float = 2.0 # /healthz answers from shard health refreshed at most this often
    warmup_s: float = 60.0         # a replica waits at most this long at start-up for its filter actors to answer (0 = not at all)
    cache_clients: int = 5000      # in-memory client states per shard (LRU); the file keeps every client
    cache_mb: float = 512.0        # ... and at most this many MiB of them per shard
    client_ttl_s: float = 2592000.0   # unblocked clients inactive this long are purged (0 = never); blocked: never
    min_admin_token_chars: int = 32   # a shorter admin token is refused at start-up


PaperSetting = Literal["mnist", "celeba"]   # which L_sp row of the filter paper's Table 1
UserPool = Literal["all", "test"]
UserProtocol = Literal["paper", "sequence", "both"]
SsimWindow = Literal["uniform7", "gaussian11"]


@dataclass
class FilterCfg:
    """The similarity filter (Raha et al., Algorithm 2): exactly its parameters, read by
    :meth:`raymia.defenses.filter.FilterParams.from_config` for Serve, as the base of
    every sweep configuration (hash_size, data_range) and by the validation.
    Defaults = Table 1, configuration 3 (MNIST row)."""
    n_b: int = 10                 # buffer size N_B
    t_ssim: float = 0.999         # match when SSIM > T_ssim ...
    t_hash: float = 0.001         # ... and |hash diff| < T_hash (images in [0, data_range])
    l_sp: int = 4                 # blocked once the suspicious counter reaches L_sp
    hash_size: int = 8            # simple hash: mean intensity after downsampling to this side
    data_range: float = 1.0
    ssim_window: SsimWindow = "uniform7"   # uniform7 = skimage's default SSIM; gaussian11 = Wang et al. / tf.image.ssim
    # which detector Serve runs: raha = Algorithm 2 exactly as the paper (these fields); robust = the
    # perceptual-fingerprint detector with a long memory (section robust_filter; not in the paper)
    kind: Literal["raha", "robust"] = "raha"


@dataclass
class RobustFilterCfg:
    """The robust stateful detector (raymia.defenses.filter.robust; ``filter.kind: robust``).
    Defaults: the thresholds ``make red-team`` calibrated on held-out benign traffic of the
    orl preset (docs/filter.md, "Red team")."""
    t_bits: int = 12              # near: Hamming distance of the 120-bit fingerprints <= t_bits (min over shifts)
    l_sp: int = 6                 # strikes (queries near an earlier one) that block the client
    window: int = 30              # strikes count within the client's last N queries (0 = all)
    l_near: int = 4               # a query near >= l_near remembered queries blocks at once (0 = off)
    # feature rule (0 = off): a query whose R_T embedding has cosine similarity >= feat_sim with >= feat_k
    # of the client's last feat_memory embeddings blocks at once (needs the model's forward pass)
    feat_k: int = 0
    feat_sim: float = 0.9
    feat_memory: int = 512
    memory: int = 4096            # fingerprints remembered per client (16 bytes each)
    shift: int = 2                # the query is also fingerprinted shifted by up to this many pixels
    base: int = 32                # canonical side before fingerprinting
    grid: int = 14                # side of the averaged central (base - 2 shift) square whose DCT is taken
    dct: int = 11                 # lowest dct x dct DCT coefficients (minus DC) are the bits
    data_range: float = 1.0
    # cross-client window (Sybil ids): refuse a query near the queries of >= cross_k other ids among
    # the last cross_window queries of all clients; off by default: popular images many users send
    # trip it (docs/filter.md measures the false positives); API keys are the production answer
    cross_client: bool = False
    cross_window: int = 2048
    cross_k: int = 4


@dataclass
class ThreatPanelCfg:
    """The threat panel (``make threat-panel``, :mod:`raymia.pipelines.threat_panel`): the query
    attacks' success against their query budget for each deployment setting, paired (same rows,
    seeds and targets in every setting).  A setting is ``none`` (R_T alone), ``dummy`` (the
    released R' at its deployed α, as Serve resolves it), ``raha<k>`` (Algorithm 2 at Table 1's
    configuration k, L_sp = ``filter.l_sp``), ``robust`` (``robust_filter``), or ``dummy+`` one
    of the filters; filters see every row as its own client."""
    budgets: list = field(default_factory=lambda: [250, 500, 1000, 2000])   # queries per row
    restarts: int = 1             # rows per known target
    attacks: list = field(default_factory=lambda: ["nes", "label"])
    settings: list = field(default_factory=lambda: ["none", "dummy", "raha1", "raha2", "raha3", "robust",
                                                    "dummy+raha3", "dummy+robust"])
    seed: int = 20_000            # row seed = seed + 1000 run.seed + 10 target + restart


@dataclass
class RedTeamCfg:
    """The red team of the filters (raymia.filter_sim.redteam, raymia.pipelines.red_team)."""
    attack_queries: int = 60      # attack queries per near-duplicate strategy
    faces: int = 5                # faces each strategy is run on (the first photo of the first identities)
    benign_sessions: int = 1000   # benign sessions per half (calibration half, report half)
    p_popular: float = 0.3        # chance that a benign session also sends popular images
    p_heavy: float = 0.05         # chance that a benign session is a heavy user (40-120 distinct images)
    fpr_target: float = 0.01      # calibration: largest share of benign sessions blocked
    t_bits_grid: list = field(default_factory=lambda: [12, 16, 20])
    l_sp_grid: list = field(default_factory=lambda: [4, 6, 8])
    window_grid: list = field(default_factory=lambda: [0, 30])   # 0 = strikes never expire
    # second stage: the smallest l_near (0 = off) that keeps the first stage's pick within fpr_target
    l_near_grid: list = field(default_factory=lambda: [3, 4, 5, 6, 8])
    # third stage (needs R_T): the feature rule on top of that pick; the fewest neighbours feat_k, then the
    # lowest similarity, that keep within fpr_target (empty feat_k_grid: no feature rule)
    feat_sim_grid: list = field(default_factory=lambda: [0.85, 0.9, 0.95])
    feat_k_grid: list = field(default_factory=lambda: [4, 6, 8, 10, 12])
    adaptive_candidates: int = 24 # transformations the adaptive attacker tries per query
    attack_rows: int = 10         # black-box / label-only rows (targets 0.. with one restart each)
    attack_budget: int = 2000     # their query budgets (both attacks)


@dataclass
class FilterSimCfg:
    """Simulations of the filter paper (section 4.5) and beyond it (raymia.filter_sim)."""
    paper_setting: PaperSetting = "mnist"   # which L_sp row of Table 1 the paper configs use
    # attacker's Gaussian noise before every query in the Table 2-6 trials (paper: unspecified).  1e-4 is
    # CHOSEN TO MATCH THE PAPER (the largest round level at which config 2 can still detect, as the paper's
    # 100% recall needs), not a default of the attack: results over sigma are the noise_grid curves
    noise_std: float = 1.0e-4
    max_iters: int = 3000         # an attack trial stops here if never blocked ("unlimited" in the paper)
    labels: list = field(default_factory=list)   # R_T classes simulated; empty = all
    trials_per_label: int = 3     # attack trials per label (paper: 3)
    user_trials_per_label: int = 3   # regular-user trials per label (paper: 3)
    user_queries: int = 100       # distinct images a regular user sends (fewer if the label has fewer)
    user_pool: UserPool = "all"   # images sequence users draw from: all (train+test of the label) | test
    # regular users: paper = per trial one random held-out test image of the label (the paper, 4.5);
    # sequence = a session of user_queries distinct images of the label; both = both, reported side by side
    user_protocol: UserProtocol = "both"
    success_conf: float = 0.9     # attack "reached the target": R_T confidence >= this before the block
    # judge the attacker's image at the block (or at the end) by R_E and the independent judges (section
    # judge): attack and noise trials, one image per distinct stopping query
    judge_at_stop: bool = True
    # --- beyond the paper: adaptive noise, Sybil attacker, cross-client check
    noise_grid: list = field(default_factory=lambda: [0.0, 3.0e-5, 1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2,
                                                              3.0e-2, 0.1])
    extra_labels: int = 3         # labels (first N of `labels`) for these experiments, 1 trial each
    sybil_k: list = field(default_factory=lambda: [1, 4, 16])
    global_size: int = 1000       # cross-client index: last queries of all clients kept
    global_l_sp: int = 0          # cross-client matches before a linked group is blocked; 0 = filter.l_sp
    actors: int = 0               # simulation actors; 0 = one per CPU (or per GPU)


@dataclass
class FilterSweepCfg:
    """The filter sweep (jobs/filter_sweep.py): which configurations are simulated, and the calibration."""
    paper_configs: list = field(default_factory=lambda: [1, 2, 3])   # Table 1 configs always included
    grid_n_b: list = field(default_factory=lambda: [10, 20])
    grid_t_ssim: list = field(default_factory=lambda: [0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999])
    grid_t_hash: list = field(default_factory=lambda: [1.0e-4, 1.0e-3, 1.0e-2])
    grid_l_sp: list = field(default_factory=list)   # empty = Table 1's L_sp for filter_sim.paper_setting
    fpr_target: float = 0.05      # calibration: fewest iterations before detection with FPR <= this
    # calibration sessions, held out from the reported ones (other attack seeds, other users / images);
    # 0 attack trials = choose on the reported sessions (not held out)
    calib_trials_per_label: int = 1
    calib_user_trials_per_label: int = 1
    ablation_data_range: float = 255.0   # also run Table 1 with SSIM's L set to this on [0,1] images (0 = off)
    # also run Table 1 with this SSIM window (paper-k-G11; "" = off): the paper used OpenCV/TF
    ablation_ssim_window: Literal["", "uniform7", "gaussian11"] = "gaussian11"


@dataclass
class Config:
    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    target: ClassifierCfg = field(default_factory=ClassifierCfg)
    evaluator: ClassifierCfg = field(default_factory=ClassifierCfg)
    gan: GanCfg = field(default_factory=GanCfg)
    attacker_gan: GanCfg = field(default_factory=GanCfg)
    dummy: DummyCfg = field(default_factory=DummyCfg)
    combine: CombineCfg = field(default_factory=CombineCfg)
    search: SearchCfg = field(default_factory=SearchCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    query_attack: QueryAttackCfg = field(default_factory=QueryAttackCfg)
    whitebox: WhiteBoxCfg = field(default_factory=WhiteBoxCfg)
    sweep: SweepCfg = field(default_factory=SweepCfg)
    judge: JudgeCfg = field(default_factory=JudgeCfg)
    study: StudyCfg = field(default_factory=StudyCfg)
    resources: ResourcesCfg = field(default_factory=ResourcesCfg)
    serve: ServeCfg = field(default_factory=ServeCfg)
    filter: FilterCfg = field(default_factory=FilterCfg)
    robust_filter: RobustFilterCfg = field(default_factory=RobustFilterCfg)
    red_team: RedTeamCfg = field(default_factory=RedTeamCfg)
    threat_panel: ThreatPanelCfg = field(default_factory=ThreatPanelCfg)
    filter_sim: FilterSimCfg = field(default_factory=FilterSimCfg)
    filter_sweep: FilterSweepCfg = field(default_factory=FilterSweepCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = get_origin(typ)
    if origin is Literal:
        choices = get_args(typ)
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{key} must be one of {', '.join(repr(c) if c == '' else str(c) for c in choices)}; "
                              f"got {value!r}")
        return value
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return int(value)
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return value
    if typ is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        item = get_args(typ)
        if item and get_origin(item[0]) is Literal:
            return [_coerce(v, item[0], f"{key}[{i}]") for i, v in enumerate(value)]
        return list(value)
    return value


def _apply(obj: Any, updates: dict, prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {updates!r}")
    hints = get_type_hints(type(obj))
    valid = {f.name for f in fields(obj)}
    for k, v in updates.items():
        key = prefix + str(k)
        if k not in valid:
            raise ConfigError(
                f"unknown config key '{key}'; valid keys here: {', '.join(sorted(valid))}")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            _apply(cur, v, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_layers(name: str, seen: tuple = ()) -> list[dict]:
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(available_presets())} "
                          "(or a path to a .yaml file)")
    if str(path) in seen:
        raise ConfigError(f"preset '{name}' extends itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path} must be a mapping")
    parent = data.pop("extends", None)
    layers = _preset_layers(parent, seen + (str(path),)) if parent else []
    return layers + [data]


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(preset: str = "orl", overrides: Optional[list[str]] = None) -> Config:
    """Build a :class:`Config` from a preset and ``key=value`` overrides."""
    cfg = Config()
    for layer in _preset_layers(preset):
        _apply(cfg, layer)
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(cfg, _nest(key, value))
    validate(cfg)
    return cfg


def apply_override(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted ``key`` of ``cfg`` in place, coerced and checked as an override is."""
    _apply(cfg, _nest(key, value))


def config_from_dict(d: dict) -> Config:
    cfg = Config()
    _apply(cfg, _split_flat_filter(d))
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Union[str, Path]) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Reject values no stage could use, with the key in the message."""
    d = cfg.data
    _check(d.image_size >= 8 and d.image_size & (d.image_size - 1) == 0,
           f"data.image_size must be a power of two >= 8, got {d.image_size}")
    _check(d.private_ids >= 2, "data.private_ids must be >= 2")
    _check(d.train_per_id >= 1 and d.test_per_id >= 1, "data.train_per_id and data.test_per_id must be >= 1")
    _check(0 <= d.eval_shared_ids <= d.private_ids, "data.eval_shared_ids must lie in [0, data.private_ids]")
    _check(d.max_ids >= 0 and d.aux_max >= 0 and d.fold >= 0, "data.max_ids, data.aux_max and data.fold must be >= 0")
    for sec in ("target", "evaluator"):
        c: ClassifierCfg = getattr(cfg, sec)
        _check(c.epochs >= 1 and c.batch_size >= 1 and c.lr > 0, f"{sec}: epochs, batch_size and lr must be positive")
        _check(c.adv_eps >= 0 and c.adv_steps >= 1 and c.adv_step >= 0,
               f"{sec}: adv_eps and adv_step must be >= 0, adv_steps >= 1")
    for sec in ("gan", "attacker_gan"):
        g: GanCfg = getattr(cfg, sec)
        _check(g.latent_dim >= 1 and g.iters >= 1 and g.batch_size >= 2, f"{sec}: latent_dim, iters >= 1, batch_size >= 2")
    dm = cfg.dummy
    _check(dm.sigma2 > 0 and dm.sigma_tilde2 > 0, "dummy.sigma2 and dummy.sigma_tilde2 must be > 0")
    _check(dm.m >= 1, "dummy.m must be >= 1")
    _check(dm.anchors_per_class >= 1, "dummy.anchors_per_class must be >= 1")
    _check(dm.anchor_pool >= 1, "dummy.anchor_pool must be >= 1")
    se = cfg.search
    _check(se.num_samples >= 1 and se.max_concurrent >= 0, "search.num_samples must be >= 1, search.max_concurrent >= 0")
    for key in ("sigma_tilde2_log", "sigma2", "m", "calib_weight_log", "epochs", "anchors_per_class", "gate_tau"):
        r = getattr(se, key)
        _check(len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r)
               and 0 < r[0] <= r[1], f"search.{key} must be [low, high] with 0 < low <= high, got {r!r}")
    _check(bool(se.anchor_choices) and bool(se.rules), "search.anchor_choices and search.rules must not be empty")
    _check(bool(se.seeds) and all(isinstance(v, int) and not isinstance(v, bool) for v in se.seeds),
           "search.seeds must be a non-empty list of integers")
    _check(se.eot_samples >= 1 and se.eot_shift >= 0 and se.eot_noise >= 0, "search.eot_*: samples >= 1, shift and noise >= 0")
    _check("whitebox" in se.check_attacks and len(set(se.check_attacks)) == len(se.check_attacks),
           "search.check_attacks must hold whitebox (the deployed alpha is chosen against it), without repeats")
    alpha_grid(SweepCfg(alphas=list(se.alphas)))
    cb = cfg.combine
    _check(0.0 < cb.gate_tau < 1.0 and cb.gate_temp > 0, "combine.gate_tau must lie in (0, 1) and combine.gate_temp be > 0")
    _check(cfg.attack.restarts >= 1 and cfg.attack.iters >= 1, "attack.restarts and attack.iters must be >= 1")
    wb = cfg.whitebox
    _check(wb.components >= 1 and wb.iters >= 1 and wb.lr > 0 and wb.bound > 0 and wb.restarts >= 1
           and wb.project_iters >= 1, "whitebox: components, iters, restarts, project_iters >= 1; lr, bound > 0")
    _check(min(wb.tv_weight, wb.norm_weight, wb.aug_samples, wb.aug_shift, wb.aug_noise) >= 0
           and wb.select_samples >= 1, "whitebox: weights, aug_samples, aug_shift, aug_noise >= 0; select_samples >= 1")
    _check(isinstance(wb.panel, dict) and all(isinstance(v, list) and all(isinstance(o, str) and "=" in o for o in v)
                                              for v in wb.panel.values()),
           "whitebox.panel must map attempt names to lists of key=value overrides")
    qa = cfg.query_attack
    _check(qa.budget >= 0 and qa.label_budget >= 0 and qa.nes_pairs >= 1 and qa.nes_sigma > 0 and qa.top_k >= 0
           and qa.label_points >= 1 and qa.label_r0 > 0 and qa.label_growth > 1 and qa.label_step > 0
           and qa.forward_batch >= 0,
           "query_attack: budgets, top_k and forward_batch >= 0, nes_pairs and label_points >= 1, nes_sigma, "
           "label_r0 and label_step > 0, label_growth > 1")
    tp = cfg.threat_panel
    _check(isinstance(tp.budgets, list) and tp.budgets and all(isinstance(b, int) and b >= 2 for b in tp.budgets)
           and tp.restarts >= 1 and tp.attacks and set(tp.attacks) <= {"nes", "label"} and tp.settings
           and all(threat_setting_ok(x) for x in tp.settings),
           "threat_panel: budgets a non-empty list of integers >= 2, restarts >= 1, attacks from {nes, label}, "
           "settings from none, dummy, raha1..raha3, robust, or dummy+<filter>")
    alpha_grid(cfg.sweep)  # raises on a bad grid
    _check(bool(cfg.sweep.attacks) and len(set(cfg.sweep.attacks)) == len(cfg.sweep.attacks),
           "sweep.attacks must be a non-empty list without repeats (whitebox, eot, nes, label)")
    _validate_serve(cfg.serve)
    _validate_filter(cfg)


def threat_setting_ok(name) -> bool:
    """A threat-panel setting name (:class:`ThreatPanelCfg`)."""
    if not isinstance(name, str):
        return False
    rest = name[len("dummy+"):] if name.startswith("dummy+") else name
    return name in ("none", "dummy") or rest == "robust" or rest in ("raha1", "raha2", "raha3")


def _validate_serve(s: "ServeCfg") -> None:
    _check(s.alpha is None or 0.0 <= s.alpha <= 1.0, f"serve.alpha must lie in [0, 1] (or null), got {s.alpha!r}")
    _check(s.shards >= 1 and s.replicas >= 1, "serve.shards and serve.replicas must be >= 1")
    _check(s.max_body_bytes >= 1024, "serve.max_body_bytes must be >= 1024")
    _check(s.top_k >= 1 and s.batch_size >= 1, "serve.top_k and serve.batch_size must be >= 1")
    _check(s.batch_wait_ms >= 0, "serve.batch_wait_ms must be >= 0")
    _check(s.replica_cpus >= 0 and s.replica_gpus >= 0 and s.torch_threads >= 0,
           "serve.replica_cpus, serve.replica_gpus and serve.torch_threads must be >= 0")
    _check(s.max_ongoing_requests >= 1, "serve.max_ongoing_requests must be >= 1")
    _check(s.admin_token_env.isidentifier(), f"serve.admin_token_env must be an environment variable name, "
           f"got {s.admin_token_env!r}")
    _check(s.warmup_s >= 0, "serve.warmup_s must be >= 0 (0 = no start-up wait)")
    _check(s.shard_timeout_s > 0 and s.health_interval_s > 0, "serve.shard_timeout_s and serve.health_interval_s "
           "must be > 0")
    _check(s.cache_clients >= 1 and s.cache_mb > 0 and s.client_ttl_s >= 0,
           "serve.cache_clients must be >= 1, serve.cache_mb > 0 and serve.client_ttl_s >= 0")
    _check(s.min_admin_token_chars >= 16, "serve.min_admin_token_chars must be >= 16")
    _check(not s.state_url or s.state_url.split("://", 1)[0] in ("postgresql", "postgres"),
           f"serve.state_url must be a postgresql:// URL (or empty for SQLite at serve.state_path), "
           f"got {s.state_url.split('://', 1)[0]!r}://...")


def _validate_filter(cfg: "Config") -> None:
    """The sections ``filter``, ``filter_sim`` and ``filter_sweep``."""
    from .defenses.filter import FilterParams
    from .paper import PAPER_TABLE1
    FilterParams.from_config(cfg.filter)          # ConfigError "filter: ..." on a bad value
    from .defenses.filter.robust import RobustParams
    RobustParams.from_config(cfg.robust_filter)   # ConfigError "robust_filter: ..."
    rf, rt = cfg.robust_filter, cfg.red_team
    _check(rf.cross_window >= 1 and rf.cross_k >= 1, "robust_filter.cross_window and robust_filter.cross_k must be >= 1")
    _check(rt.attack_queries >= 2 and rt.benign_sessions >= 10 and rt.attack_rows >= 1 and rt.attack_budget >= 10,
           "red_team.attack_queries >= 2, red_team.benign_sessions >= 10, red_team.attack_rows >= 1 and "
           "red_team.attack_budget >= 10 are required")
    _check(0.0 <= rt.fpr_target <= 1.0 and 0.0 <= rt.p_popular <= 1.0 and 0.0 <= rt.p_heavy <= 1.0,
           "red_team.fpr_target, red_team.p_popular and red_team.p_heavy must lie in [0, 1]")
    _check(bool(rt.window_grid) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                        for v in rt.window_grid), "red_team.window_grid must list integers >= 0")
    _check(bool(rt.t_bits_grid) and bool(rt.l_sp_grid)
           and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rt.t_bits_grid + rt.l_sp_grid),
           "red_team.t_bits_grid and red_team.l_sp_grid must list integers >= 1")
    _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rt.l_near_grid),
           "red_team.l_near_grid must list integers >= 1 (empty: no cluster rule)")
    _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in rt.feat_k_grid)
           and all(isinstance(v, (int, float)) and not isinstance(v, bool) and -1.0 <= v <= 1.0
                   for v in rt.feat_sim_grid) and (bool(rt.feat_sim_grid) or not rt.feat_k_grid),
           "red_team.feat_k_grid must list integers >= 1 and red_team.feat_sim_grid cosine similarities in [-1, 1]")
    f = cfg.filter_sim
    _check(f.max_iters >= 1 and f.trials_per_label >= 1 and f.user_trials_per_label >= 0,
           "filter_sim.max_iters and filter_sim.trials_per_label must be >= 1, filter_sim.user_trials_per_label >= 0")
    _check(f.user_queries >= 2, "filter_sim.user_queries must be >= 2 (one query alone can never match)")
    _check(f.noise_std >= 0 and all(_num(v) and v >= 0 for v in f.noise_grid),
           "filter_sim.noise_std and filter_sim.noise_grid values must be numbers >= 0")
    _check(0.0 <= f.success_conf <= 1.0, "filter_sim.success_conf must lie in [0, 1]")
    for name in ("labels", "sybil_k"):
        vals = getattr(f, name)
        _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= (0 if name == "labels" else 1) for v in vals),
               f"filter_sim.{name} must list integers >= {0 if name == 'labels' else 1}, got {vals!r}")
    _check(f.extra_labels >= 0 and f.global_size >= 1 and f.global_l_sp >= 0 and f.actors >= 0,
           "filter_sim.extra_labels, filter_sim.global_l_sp and filter_sim.actors must be >= 0, "
           "filter_sim.global_size >= 1")
    w = cfg.filter_sweep
    _check(0.0 <= w.fpr_target <= 1.0, "filter_sweep.fpr_target must lie in [0, 1]")
    _check(w.calib_trials_per_label >= 0 and w.calib_user_trials_per_label >= 0,
           "filter_sweep.calib_trials_per_label and filter_sweep.calib_user_trials_per_label must be >= 0")
    _check(all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= len(PAPER_TABLE1) for k in w.paper_configs),
           f"filter_sweep.paper_configs must list Table 1 configurations 1..{len(PAPER_TABLE1)}, got {w.paper_configs!r}")
    for name in ("grid_n_b", "grid_l_sp"):
        vals = getattr(w, name)
        _check(all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals),
               f"filter_sweep.{name} must list integers >= 1, got {vals!r}")
    _check(all(_num(v) and -1 <= v <= 1 for v in w.grid_t_ssim), "filter_sweep.grid_t_ssim values must lie in [-1, 1]")
    _check(all(_num(v) and v >= 0 for v in w.grid_t_hash), "filter_sweep.grid_t_hash values must be numbers >= 0")
    _check(bool(w.paper_configs) or bool(w.grid_n_b and w.grid_t_ssim and w.grid_t_hash),
           "filter_sweep: the sweep needs paper_configs or non-empty grid_n_b, grid_t_ssim and grid_t_hash")
    _check(w.ablation_data_range >= 0, "filter_sweep.ablation_data_range must be >= 0 (0 = off)")


def _split_flat_filter(d: Any) -> Any:
    """A stored config dict from before ``filter`` was split (one flat section holding the
    filter's parameters, the simulations' and the sweep's settings -- e.g. the manifest of
    an artifact trained then) with the simulation and sweep keys moved to ``filter_sim``
    and ``filter_sweep``; any other dict is returned unchanged."""
    f = d.get("filter") if isinstance(d, dict) else None
    if not isinstance(f, dict):
        return d
    sim = {k: v for k, v in f.items() if k in {x.name for x in fields(FilterSimCfg)}}
    sweep = {k: v for k, v in f.items() if k in {x.name for x in fields(FilterSweepCfg)}}
    if not sim and not sweep:
        return d
    out = {**d, "filter": {k: v for k, v in f.items() if k not in sim and k not in sweep}}
    for name, moved in (("filter_sim", sim), ("filter_sweep", sweep)):
        if moved:
            out[name] = {**moved, **(d.get(name) or {})}
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def alpha_grid(s: SweepCfg) -> list[float]:
    """The α values of a sweep, validated: all in [0, 1], at least one."""
    if s.alphas:
        grid = []
        for a in s.alphas:
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise ConfigError(f"sweep.alphas: {a!r} is not a number")
            grid.append(float(a))
    else:
        if not (0.0 <= s.alpha_start <= 1.0 and 0.0 <= s.alpha_stop <= 1.0):
            raise ConfigError("sweep.alpha_start and sweep.alpha_stop must lie in [0, 1]")
        if s.alpha_step <= 0:
            raise ConfigError("sweep.alpha_step must be > 0")
        if s.alpha_stop < s.alpha_start:
            raise ConfigError("sweep.alpha_stop must be >= sweep.alpha_start")
        # whole steps that fit in [start, stop] (a step that does not divide the range ends
        # below stop, and stop itself is added), never a value beyond stop
        n = int(math.floor((s.alpha_stop - s.alpha_start) / s.alpha_step + 1e-9))
        grid = [round(s.alpha_start + i * s.alpha_step, 6) for i in range(n + 1)]
        if grid[-1] < s.alpha_stop - 1e-9:
            grid.append(float(s.alpha_stop))
    bad = [a for a in grid if not (0.0 <= a <= 1.0)]
    if bad:
        raise ConfigError(f"sweep.alphas: values outside [0, 1]: {bad}")
    if not grid:
        raise ConfigError("sweep.alphas is empty")
    return sorted(set(grid), reverse=True)


def add_cli_args(parser) -> None:
    parser.add_argument("--preset", default="orl",
                        help=f"config preset ({', '.join(available_presets())}) or a YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set target.epochs=3 (repeatable)")
