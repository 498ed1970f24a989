//! Properties of the cost model and the search over many generated jobs and clusters.

use super::*;

fn llama(layers: usize, hidden: usize, heads: usize, kv: usize, experts: usize) -> ModelShape {
    ModelShape {
        layers,
        hidden,
        heads,
        kv_heads: kv,
        head_dim: hidden / heads,
        ffn: hidden * 7 / 2,
        vocab: 32000,
        experts,
        top_k: if experts > 0 { 2 } else { 0 },
        gated_mlp: true,
        tied_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        norm_bias: false,
        dropout: false,
    }
}

fn h100(gpus_per_node: usize, memory_gib: f64) -> Hardware {
    Hardware {
        name: "test".into(),
        peak_tflops: 989.0,
        peak_tflops_f32: 495.0,
        achievable_fraction: 0.6,
        memory_gib,
        reserved_gib: 2.0,
        memory_bandwidth_gbs: 2900.0,
        intra_node_gbs: 360.0,
        inter_node_gbs: 400.0,
        gpus_per_node,
        kernel_overhead_us: 4.0,
        latency_us: 10.0,
    }
}

/// Data parallelism over `dp` ranks alone: micro-batch 1, no recomputation, no ZeRO-1.
fn data_parallel(dp: usize) -> Candidate {
    Candidate {
        dp,
        tp: 1,
        pp: 1,
        ep: 1,
        micro_batch: 1,
        recompute: false,
        zero1: false,
        virtual_stages: 1,
    }
}

fn job(model: ModelShape, global_batch: usize, mode: Mode) -> Job {
    Job {
        model,
        seq_len: 2048,
        global_batch,
        mode,
        precision: Precision::Bf16Mixed,
        sequence_parallel: false,
        scatter_gather_sends: false,
    }
}

/// Jobs and clusters of many shapes: dense and MoE, full and LoRA, GQA, odd batches,
/// small and large memories.
fn cases() -> Vec<(Job, Hardware, usize)> {
    let lora = Mode::Lora {
        rank: 16,
        targets: LoraTargets::all(),
    };
    let mut out = Vec::new();
    for (i, model) in [
        llama(16, 2048, 16, 4, 0),
        llama(32, 4096, 32, 8, 0),
        llama(24, 3072, 24, 24, 0),
        llama(32, 4096, 32, 8, 8),
        llama(80, 8192, 64, 8, 0),
    ]
    .into_iter()
    .enumerate()
    {
        for (j, world) in [8usize, 12, 16, 64].into_iter().enumerate() {
            let mode = if (i + j) % 2 == 0 { Mode::Full } else { lora };
            let batch = [64, 96, 30, 128][(i + j) % 4];
            let memory = [24.0, 80.0, 141.0][(i + 2 * j) % 3];
            out.push((job(model.clone(), batch, mode), h100(8, memory), world));
        }
    }
    out
}

#[test]
fn every_candidate_fits_divides_and_is_ranked_and_every_rejection_says_why() {
    for (job, hw, world) in cases() {
        let plan = search(&job, &hw, world, &Space::default());
        let m = &job.model;
        for p in &plan.candidates {
            let c = p.candidate;
            let what = format!("{c} on {world} for {m:?}");
            assert_eq!(c.world(), world, "{what}");
            assert!(p.estimate.memory.total() <= hw.memory_bytes(), "{what}");
            assert!(
                m.heads.is_multiple_of(c.tp) && m.vocab.is_multiple_of(c.tp),
                "{what}"
            );
            assert!(m.kv_heads.is_multiple_of(c.tp) || c.tp.is_multiple_of(m.kv_heads));
            assert!(hw.gpus_per_node.is_multiple_of(c.tp), "{what}");
            assert!(c.ep == 1 || m.experts.is_multiple_of(c.ep), "{what}");
            assert!(c.pp * c.virtual_stages <= m.layers, "{what}");
            assert!(
                job.global_batch
                    .is_multiple_of(c.micro_batch * c.data_ranks()),
                "{what}"
            );
            if c.virtual_stages > 1 {
                let micro = job.global_batch / (c.micro_batch * c.data_ranks());
                assert!(micro.is_multiple_of(c.pp), "{what}");
            }
            assert!(p.estimate.step_time_s.is_finite() && p.estimate.step_time_s > 0.0);
            assert!(
                p.estimate.mfu > 0.0 && p.estimate.mfu < 1.0,
                "{what}: {}",
                p.estimate.mfu
            );
        }
        for w in plan.candidates.windows(2) {
            assert!(w[0].estimate.step_time_s <= w[1].estimate.step_time_s);
        }
        for r in &plan.rejected {
            assert!(!r.reason.is_empty() && !r.layout.is_empty(), "{r:?}");
        }
        // What does not fit is rejected as such, never listed.
        let tight = Hardware {
            memory_gib: 6.0,
            ..hw.clone()
        };
        let plan = search(&job, &tight, world, &Space::default());
        assert!(plan
            .candidates
            .iter()
            .all(|p| p.estimate.memory.total() <= tight.memory_bytes()));
        assert!(plan
            .rejected
            .iter()
            .any(|r| r.reason.starts_with("does not fit")));
    }
}

#[test]
fn pinned_choices_are_the_only_ones_priced() {
    let job = job(llama(32, 4096, 32, 8, 0), 64, Mode::Full);
    let hw = h100(8, 80.0);
    let space = Space {
        tp: Some(8),
        pp: Some(2),
        recompute: Some(true),
        ..Space::default()
    };
    let plan = search(&job, &hw, 32, &space);
    assert!(!plan.candidates.is_empty());
    for p in &plan.candidates {
        assert_eq!((p.candidate.tp, p.candidate.pp, p.candidate.dp), (8, 2, 2));
        assert!(p.candidate.recompute);
    }
    // A pin the cluster cannot honour is a rejection with its reason.
    let plan = search(
        &job,
        &hw,
        32,
        &Space {
            tp: Some(16),
            ..Space::default()
        },
    );
    assert!(plan.candidates.is_empty());
    assert!(
        plan.rejected[0].reason.contains("devices of a node"),
        "{:?}",
        plan.rejected
    );
    let plan = search(
        &job,
        &hw,
        32,
        &Space {
            tp: Some(3),
            ..Space::default()
        },
    );
    assert!(plan.candidates.is_empty() && !plan.rejected.is_empty());
}

#[test]
fn each_lever_moves_memory_and_time_the_way_it_should() {
    let job = job(llama(32, 4096, 32, 8, 0), 64, Mode::Full);
    let hw = h100(8, 80.0);
    let sizes = |pp: usize, v: usize| balance(&job.model.layer_costs(), pp * v);
    let base = data_parallel(8);
    let at = |c: Candidate| estimate(&job, &hw, c, &sizes(c.pp, c.virtual_stages));
    let e = at(base);
    let z = at(Candidate {
        zero1: true,
        ..base
    });
    // An eighth, but of whole tensors: the fullest rank a little above.
    let eighth = z.memory.optimizer / (e.memory.optimizer / 8.0);
    assert!((1.0..1.03).contains(&eighth), "{eighth}");
    assert_eq!(z.memory.weights, e.memory.weights);
    let r = at(Candidate {
        recompute: true,
        ..base
    });
    assert!(r.memory.activations < e.memory.activations / 4.0);
    assert!(r.step_time_s > e.step_time_s && r.flops > e.flops);
    assert_eq!(r.model_flops, e.model_flops);
    let t = at(Candidate {
        tp: 2,
        dp: 4,
        ..base
    });
    assert!(t.memory.weights < 0.55 * e.memory.weights);
    assert!(t.tp_comm_s > 0.0 && e.tp_comm_s == 0.0);
    let p = at(Candidate {
        pp: 2,
        dp: 4,
        ..base
    });
    let pv = at(Candidate {
        pp: 2,
        dp: 4,
        virtual_stages: 4,
        ..base
    });
    assert!(p.bubble_s > 0.0 && pv.bubble_s < p.bubble_s && pv.pp_comm_s > p.pp_comm_s);
    let mb = at(Candidate {
        micro_batch: 4,
        ..base
    });
    assert!(mb.memory.activations > 3.9 * e.memory.activations - 4.0 * 32000.0 * 2048.0 * 10.0);
    // LoRA trains the adapters only: gradients and AdamW state shrink to them.
    let lora = Job {
        mode: Mode::Lora {
            rank: 8,
            targets: LoraTargets::all(),
        },
        ..job.clone()
    };
    let l = estimate(&lora, &hw, base, &sizes(1, 1));
    assert!(l.memory.grads < e.memory.grads / 50.0);
    assert!(l.memory.weights > e.memory.weights && l.step_time_s < e.step_time_s);
}

#[test]
fn gpt_flops_with_recomputation_are_megatrons_formula() {
    // Narayanan et al. (2021): 96·B·s·l·h²·(1 + s/6h + V/16lh) per step.
    let (l, h, a, v, s, b) = (24usize, 2304usize, 24usize, 51200usize, 2048usize, 512usize);
    let model = ModelShape::gpt(l, h, a, v);
    let job = Job {
        seq_len: s,
        ..job(model, b, Mode::Full)
    };
    let c = Candidate {
        micro_batch: 2,
        recompute: true,
        ..data_parallel(32)
    };
    let e = estimate(&job, &h100(8, 80.0), c, &[l]);
    let (bf, sf, lf, hf, vf) = (b as f64, s as f64, l as f64, h as f64, v as f64);
    let paper = 96.0 * bf * sf * lf * hf * hf * (1.0 + sf / (6.0 * hf) + vf / (16.0 * lf * hf));
    assert!(
        (e.flops / paper - 1.0).abs() < 1e-12,
        "{} vs {paper}",
        e.flops
    );
    // Without it: three passes of the layers instead of four; the head is never recomputed.
    let model = 72.0 * bf * sf * lf * hf * hf * (1.0 + sf / (6.0 * hf)) + 6.0 * bf * sf * hf * vf;
    assert!((e.model_flops / model - 1.0).abs() < 1e-12);
}

#[test]
fn parameters_are_counted_as_the_layers_hold_them() {
    // Llama-2 7B: 6,738,415,616 parameters.
    let m = ModelShape {
        ffn: 11008,
        ..llama(32, 4096, 32, 32, 0)
    };
    let whole = Share {
        tp: 1,
        ep: 1,
        layers: 32,
        first: true,
        last: true,
    };
    assert_eq!(m.params(&Mode::Full, &whole).weights, 6_738_415_616);
    // Mixtral 8x7B: 46,702,792,704.
    let mixtral = ModelShape {
        ffn: 14336,
        ..llama(32, 4096, 32, 8, 8)
    };
    assert_eq!(mixtral.params(&Mode::Full, &whole).weights, 46_702_792_704);
    // Split over tp × pp × ep, the shares add up to the whole (kv heads cut, not copied).
    let parts: u64 = (0..2)
        .map(|stage| {
            let share = Share {
                tp: 2,
                ep: 4,
                layers: 16,
                first: stage == 0,
                last: stage == 1,
            };
            let p = mixtral.params(&Mode::Full, &share);
            let dense = p.weights - p.expert_trainable;
            2 * 4 * p.expert_trainable + 2 * dense
        })
        .sum();
    let norms_and_routers = 32 * (2 * 4096 + 4096 * 8) + 4096;
    assert_eq!(
        parts,
        46_702_792_704 + norms_and_routers,
        "replicated over tp: norms and routers"
    );
}

#[test]
fn divisors_are_all_found_in_order() {
    for n in 1..200 {
        let slow: Vec<usize> = (1..=n).filter(|d| n % d == 0).collect();
        assert_eq!(super::search::divisors(n), slow, "{n}");
    }
}

/// Llama-3.2-1B: 16 layers, hidden 2048, 32 heads (8 kv), ffn 8192, vocab 128256, the head
/// tied to the embedding (262.7M of its 1.236B parameters).
fn llama_1b() -> ModelShape {
    ModelShape {
        ffn: 8192,
        vocab: 128_256,
        tied_embeddings: true,
        ..llama(16, 2048, 32, 8, 0)
    }
}

/// The tensors the cost model lists for ZeRO-1's split add up to the parameters it
/// counts a rank training, for every job of [`cases`] and every way of cutting it.
#[test]
fn trained_tensors_add_up_to_the_trained_parameters() {
    for (job, _, _) in cases() {
        let m = &job.model;
        for (tp, ep, layers, first, last) in [
            (1, 1, m.layers, true, true),
            (2, 1, m.layers / 2, true, false),
            (4, 1, m.layers / 2, false, true),
            (1, 2, 1, false, false),
            (2, 2, 0, false, true),
        ] {
            if m.experts > 0 && m.experts % ep != 0 || m.experts == 0 && ep > 1 {
                continue;
            }
            let share = Share {
                tp,
                ep,
                layers,
                first,
                last,
            };
            let held = m.params(&job.mode, &share);
            let (dense, experts) = m.trained_tensors(&job.mode, &share);
            let what = format!("{m:?} {:?} {share:?}", job.mode);
            assert_eq!(experts.iter().sum::<u64>(), held.expert_trainable, "{what}");
            assert_eq!(
                dense.iter().sum::<u64>() + held.expert_trainable,
                held.trainable,
                "{what}"
            );
        }
    }
}

/// Where one tensor outweighs an even share, ZeRO-1 keeps it whole on one rank: Llama-3.2-1B
/// at dp 8 keeps the embedding's AdamW state there (not an eighth of the model's), and its
/// reduce-scatter and all-gather move every rank's chunk padded to the embedding's length,
/// more than the all-reduce they replace.
#[test]
fn zero1_prices_the_fullest_rank_where_one_tensor_outweighs_an_even_share() {
    let m = llama_1b();
    let job = job(m, 64, Mode::Full);
    let hw = h100(8, 80.0);
    let base = data_parallel(8);
    let sizes = balance(&job.model.layer_costs(), 1);
    let e = estimate(&job, &hw, base, &sizes);
    let z = estimate(
        &job,
        &hw,
        Candidate {
            zero1: true,
            ..base
        },
        &sizes,
    );
    let embedding = (128_256 * 2048) as f64;
    let bytes = job.precision.optimizer_bytes() as f64;
    assert_eq!(z.memory.optimizer, embedding * bytes);
    assert!(z.memory.optimizer > 1.6 * e.memory.optimizer / 8.0);
    // The all-gather alone (it comes after the optimizer: nothing hides it) moves 7 chunks
    // of the embedding's length per rank; even shares would move 7/8 of the model, 1.7x less.
    let gather = 7.0 * embedding * job.precision.weight_bytes() as f64 / hw.group_bandwidth(8, 1);
    assert!(z.dp_comm_s > gather, "{} vs {gather}", z.dp_comm_s);
    assert!(
        z.dp_comm_s > e.dp_comm_s,
        "{} vs {}",
        z.dp_comm_s,
        e.dp_comm_s
    );
    // Llama-2-7B's embedding (131M) is below an eighth of it (842M): an even share, but
    // of whole tensors, the fullest rank 1.5 % above.
    let big = Job {
        model: ModelShape {
            ffn: 11008,
            ..llama(32, 4096, 32, 32, 0)
        },
        ..job
    };
    let sizes = balance(&big.model.layer_costs(), 1);
    let e = estimate(&big, &hw, base, &sizes);
    let z = estimate(
        &big,
        &hw,
        Candidate {
            zero1: true,
            ..base
        },
        &sizes,
    );
    let eighth = z.memory.optimizer / (e.memory.optimizer / 8.0);
    assert!((1.01..1.02).contains(&eighth), "{eighth}");
}
