#!/usr/bin/env nextflow
/*
 * fm-suite earth-observation pipeline
 *
 *   [EARTHOBS_DEMO]     generated scenes standing in for BigEarthNet    (only with --bigearthnet_root demo)
 *   EARTHOBS_PREPARE    packs each evaluation split once into --packed_dir (CPU)
 *   [EARTHOBS_PRETRAIN] SoftCon continual pretraining, multi-GPU / multi-node (only with --earthobs_pretrain)
 *   EARTHOBS_EVAL       frozen-encoder linear probe / kNN per data set (BigEarthNet, EuroSAT)
 *   TRACK               logs every task's offline MLflow run in one process
 *
 * Every process runs exactly one fm-* command: what Nextflow runs is what the CLI runs.
 *
 *   nextflow run workflows/earthobs.nf -profile slurm --pretrain_data ssl4eo:/data/ssl4eo-s12 \
 *       --pretrain_labels /data/dw_labels.json --bigearthnet_root /data/BigEarthNet-v1.0 --eurosat_root /data/EuroSAT
 *   nextflow run workflows/earthobs.nf -profile test,local
 */
nextflow.enable.dsl = 2

include { EARTHOBS_DEMO     } from './modules/earthobs_demo'
include { EARTHOBS_PREPARE  } from './modules/earthobs_prepare'
include { EARTHOBS_PRETRAIN } from './modules/earthobs_pretrain'
include { EARTHOBS_EVAL     } from './modules/earthobs_eval'
include { TRACK             } from './modules/track'

def optionalFile(path) {
    return path ? file(path, checkIfExists: true) : []
}

// PRETRAIN's runs folder (see the module): this session's folder under --pretrain_runs_dir, so that a
// retried task, or the task after `-resume` (the same session), continues from its checkpoints there.
def pretrainRunsDir() {
    if (!params.pretrain_resume) {
        return ''
    }
    def base = params.pretrain_runs_dir ?: "${params.outdir}/pretrain/runs"
    return "${file(base).toAbsolutePath()}/${workflow.sessionId}"
}

// The cache folder `fm-eval earthobs` reads: BigEarthNet packs are named by version, detected as
// fm-eval detects it (v2 ships metadata.parquet), so that PREPARE fills the folders EVAL opens.
def packName(String dataset, String root) {
    if (dataset != 'bigearthnet') {
        return dataset
    }
    return file("${root}/metadata.parquet").exists() ? 'bigearthnet-v2' : 'bigearthnet-v1'
}

// The training fraction the probe uses: BigEarthNet's 10 % subset by default, all of EuroSAT.
def trainFraction(String dataset) {
    return dataset == 'eurosat' ? params.eurosat_train_fraction : params.train_fraction
}

def trackingUri() {
    return params.tracking_uri ?: "sqlite:///${file(params.outdir).toAbsolutePath()}/mlflow.db"
}

workflow EARTHOBS {
    main:
    def datasets = params.eval_datasets ? params.eval_datasets.tokenize(',')*.trim() : []
    def roots = [bigearthnet: params.bigearthnet_root, eurosat: params.eurosat_root]
    datasets.each { name ->
        if (!roots.containsKey(name)) {
            error "--eval_datasets: unknown data set '${name}'; use bigearthnet and/or eurosat"
        }
        if (!roots[name]) {
            error "--eval_datasets names ${name}: give its folder with --${name}_root"
        }
    }
    if (params.earthobs_pretrain && !params.pretrain_data) {
        error "--earthobs_pretrain needs --pretrain_data (ssl4eo:ROOT, bigearthnet:ROOT or demo)"
    }
    if (!params.earthobs_pretrain && datasets && !params.eo_encoder) {
        error "without pretraining, --eo_encoder names the encoder to evaluate (registered name or checkpoint)"
    }
    if (params.tracking_direct && !params.tracking_uri) {
        error "--tracking_direct needs --tracking_uri (an MLflow tracking server)"
    }
    def packed_dir = file(params.packed_dir ?: "${params.outdir}/packed").toAbsolutePath().toString()
    ch_tracking = Channel.empty()

    // data set folders; `demo` generates BigEarthNet-like scenes
    ch_roots = Channel.empty()
    if ('bigearthnet' in datasets) {
        if (params.bigearthnet_root == 'demo') {
            EARTHOBS_DEMO()
            ch_roots = ch_roots.mix(EARTHOBS_DEMO.out.root.map { root -> tuple('bigearthnet', root.toString()) })
        } else {
            ch_roots = ch_roots.mix(Channel.of(tuple('bigearthnet', file(params.bigearthnet_root, checkIfExists: true).toString())))
        }
    }
    if ('eurosat' in datasets) {
        ch_roots = ch_roots.mix(Channel.of(tuple('eurosat', file(params.eurosat_root, checkIfExists: true).toString())))
    }

    // PREPARE: the training fraction and the test split of each data set, as EVAL reads them
    ch_splits = ch_roots.flatMap { name, root ->
        def pack = packName(name, root)
        [tuple(name, pack, root, 'train', trainFraction(name)), tuple(name, pack, root, 'test', '')]
    }
    EARTHOBS_PREPARE(ch_splits, packed_dir)
    ch_tracking = ch_tracking.mix(EARTHOBS_PREPARE.out.tracking)
    ch_ready = EARTHOBS_PREPARE.out.packed.groupTuple(size: 2).map { name, root_list -> tuple(name, root_list[0], trainFraction(name)) }

    // PRETRAIN (optional): EVAL then evaluates its teacher
    if (params.earthobs_pretrain) {
        EARTHOBS_PRETRAIN(optionalFile(params.pretrain_labels), optionalFile(params.earthobs_config), optionalFile(params.init_weights), pretrainRunsDir())
        ch_checkpoint = EARTHOBS_PRETRAIN.out.teacher
        ch_tracking = ch_tracking.mix(EARTHOBS_PRETRAIN.out.tracking)
    } else {
        ch_checkpoint = Channel.value([])
    }

    // EVAL: one task per data set
    EARTHOBS_EVAL(ch_ready, packed_dir, params.eo_encoder ?: '', ch_checkpoint, optionalFile(params.eo_encoder_weights))
    ch_tracking = ch_tracking.mix(EARTHOBS_EVAL.out.tracking)

    if (!params.tracking_direct) {
        TRACK(ch_tracking.collect(sort: true), trackingUri())
    }

    emit:
    results = EARTHOBS_EVAL.out.results
}

workflow {
    EARTHOBS()
}
