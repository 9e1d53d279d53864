#!/usr/bin/env nextflow
/*
 * fm-suite pathology pipeline
 *
 *   [PATHOLOGY_SAMPLESHEET]  demo cohort -> samplesheet.csv            (only with --samplesheet demo)
 *   PATHOLOGY_TILE           one CPU task per slide -> tiles/<slide_id>/coords.h5
 *   [PATHOLOGY_PRETRAIN]     DINOv2 on all tiles, multi-GPU / multi-node  (only with --pathology_pretrain)
 *   PATHOLOGY_EXTRACT        one GPU task per shard of slides -> features/<slide_id>.h5
 *   PATHOLOGY_EVAL           MIL, k folds x seeds, on --eval_task          (only with --eval_task)
 *   TRACK                    logs every task's offline MLflow run in one process
 *
 * Every process runs exactly one fm-* command: what Nextflow runs is what the CLI runs.
 *
 *   nextflow run workflows/pathology.nf -profile slurm --samplesheet slides.csv --eval_task csv:/abs/labels.csv
 *   nextflow run workflows/pathology.nf -profile test,local
 */
nextflow.enable.dsl = 2

include { PATHOLOGY_SAMPLESHEET } from './modules/pathology_samplesheet'
include { PATHOLOGY_TILE        } from './modules/pathology_tile'
include { PATHOLOGY_PRETRAIN    } from './modules/pathology_pretrain'
include { PATHOLOGY_EXTRACT     } from './modules/pathology_extract'
include { PATHOLOGY_EVAL        } from './modules/pathology_eval'
include { TRACK                 } from './modules/track'

// A samplesheet row must name its slide with an absolute path: Nextflow stages the samplesheet as a
// link in each task folder, so a relative path would be read relative to that folder.
def checkSlideRow(Map row) {
    def missing = ['slide_id', 'patient_id', 'slide_path'].findAll { column -> !row[column] }
    if (missing) {
        error "samplesheet ${params.samplesheet}: row ${row} lacks ${missing.join(', ')}; columns: slide_id, patient_id, slide_path[, mpp, label columns]"
    }
    if (!row.slide_path.startsWith('/') && !(row.slide_path ==~ /^[a-z0-9]+:\/\/.+/)) {
        error "samplesheet ${params.samplesheet}: slide ${row.slide_id} has a relative slide_path '${row.slide_path}'; use an absolute path"
    }
    return row.slide_id
}

// An optional file parameter as a process input: the file, or [] (nothing staged).
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

// Offline runs are logged here by TRACK: the given URI, else a SQLite file in --outdir.
def trackingUri() {
    return params.tracking_uri ?: "sqlite:///${file(params.outdir).toAbsolutePath()}/mlflow.db"
}

workflow PATHOLOGY {
    main:
    if (!params.samplesheet) {
        error "pathology: --samplesheet is required (a CSV with slide_id, patient_id, slide_path, or 'demo')"
    }
    if (params.tracking_direct && !params.tracking_uri) {
        error "--tracking_direct needs --tracking_uri (an MLflow tracking server)"
    }
    if (params.extract_shard_size < 1) {
        error "--extract_shard_size must be >= 1, got ${params.extract_shard_size}"
    }
    ch_tracking = Channel.empty()

    // samplesheet: the user's CSV, or the generated demo cohort
    if (params.samplesheet == 'demo') {
        PATHOLOGY_SAMPLESHEET()
        ch_sheet = PATHOLOGY_SAMPLESHEET.out.samplesheet
    } else {
        ch_sheet = Channel.fromPath(params.samplesheet, checkIfExists: true)
    }
    ch_samplesheet = ch_sheet.first()  // a value channel: every task reads the same file
    ch_slide_ids = ch_sheet.splitCsv(header: true).map { row -> checkSlideRow(row) }

    // TILE: one task per slide; a slide that could not be tiled emits no tiles (see tiles/manifest.csv)
    PATHOLOGY_TILE(ch_slide_ids, ch_samplesheet)
    PATHOLOGY_TILE.out.manifest.collectFile(name: 'manifest.csv', keepHeader: true, skip: 1, storeDir: "${params.outdir}/tiles")
    // sorted by slide id: lists that feed a task are in the same order in every run, so -resume finds it
    ch_tiles = PATHOLOGY_TILE.out.tiles
        .map { slide_id, dir, coords -> tuple(slide_id, dir) }
        .toSortedList { a, b -> a[0] <=> b[0] }
        .map { pairs -> pairs ?: error("no slide of ${params.samplesheet} could be tiled: see ${params.outdir}/tiles/manifest.csv") }

    // PRETRAIN (optional): DINOv2 on the tiles of all slides; EXTRACT then uses its teacher
    if (params.pathology_pretrain) {
        PATHOLOGY_PRETRAIN(ch_samplesheet, ch_tiles.map { pairs -> pairs.collect { pair -> pair[1] } }, optionalFile(params.pathology_config), pretrainRunsDir())
        ch_checkpoint = PATHOLOGY_PRETRAIN.out.teacher  // a value channel (all inputs are): every shard gets it
        ch_tracking = ch_tracking.mix(PATHOLOGY_PRETRAIN.out.tracking)
    } else {
        ch_checkpoint = Channel.value([])
    }

    // EXTRACT: shards of --extract_shard_size slides, formed from the sorted slide ids so that the
    // same slides always make the same shard (and -resume finds its cached tasks)
    ch_shards = ch_tiles
        .flatMap { pairs -> pairs.collate(params.extract_shard_size) }
        .map { shard ->
            def ids = shard.collect { pair -> pair[0] }
            tuple(ids.size() > 1 ? "${ids[0]}..${ids[-1]}" : ids[0], ids.join(','), shard.collect { pair -> pair[1] })
        }
    PATHOLOGY_EXTRACT(ch_shards, ch_samplesheet, params.encoder, ch_checkpoint, optionalFile(params.encoder_weights))
    PATHOLOGY_EXTRACT.out.manifest.collectFile(name: 'extract_manifest.csv', keepHeader: true, skip: 1, storeDir: "${params.outdir}/features")
    ch_tracking = ch_tracking.mix(PATHOLOGY_EXTRACT.out.tracking)

    // EVAL (optional): MIL on the features of every slide (labelled slides without features are left
    // out with --drop_missing, and listed by fm-eval)
    if (params.eval_task) {
        def labels = params.eval_task.startsWith('csv:') ? file(params.eval_task.substring(4), checkIfExists: true) : []
        ch_features = PATHOLOGY_EXTRACT.out.features.flatten().collect(sort: true)
            .ifEmpty { error("no slide has features: see ${params.outdir}/features/extract_manifest.csv") }
        PATHOLOGY_EVAL(ch_features, params.eval_task, labels)
        ch_tracking = ch_tracking.mix(PATHOLOGY_EVAL.out.tracking)
    }

    // TRACK: one writer for all runs (tasks log straight to a tracking server with --tracking_direct)
    if (!params.tracking_direct) {
        TRACK(ch_tracking.collect(sort: true), trackingUri())
    }

    emit:
    features = PATHOLOGY_EXTRACT.out.features
}

workflow {
    PATHOLOGY()
}
