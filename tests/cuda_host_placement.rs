//! `memory.reference = "host"` (the reference streamed layer by layer from host memory) and
//! `memory.grads = "host"` (gradients summed in host memory) on the CUDA backend: the streamed
//! passes (bf16 host copy) and the host gradient sums bit for bit against the resident ones
//! (random models and batches; `TOOLN1_TEST_SEED` replays), and GRPO (with a resume onto the
//! device placement) and SFT runs with bit-identical final weights.
//!
//! The streamed layers are in page-locked memory and uploaded on the copy stream while the
//! previous layer computes. Streaming and host sums run the same kernels on the same values, so
//! they are exact on any GPU. The runs that also move the optimizer to the host are compared only on the virtual
//! GPU, where the AdamW kernel is built without fused multiply-adds like the host update
//! (`backend::host_adamw`).

mod common;

use common::placement::{self as pl, same};
use common::{gpu, Rng};
use tooln1::model::{init, Model};
use tooln1::train::config::Place;

fn virtual_gpu() -> bool {
    gpu().is_some_and(|c| c.device().contains("virtual GPU"))
}

#[test]
fn the_streamed_reference_gives_the_resident_bits() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("cuda_host_placement streamed");
    for tied in [false, true] {
        let cfg = init::tiny_config(128, 2, 2, 1, 96, 96, tied);
        let host = Model::random(&c, cfg.clone(), r.next())
            .unwrap()
            .to_host(&c)
            .unwrap();
        let s = Model::from_host(&c, cfg.clone(), &host)
            .unwrap()
            .into_streamed(&c)
            .unwrap();
        assert!(s.host_layers().unwrap().is_bf16(), "bf16 device weights");
        // Page-locked host memory, so that the uploads run on the copy stream.
        assert!(s.host_layers().unwrap().pinned(), "pinned host layers");
        pl::check_streamed_reference(&c, &cfg, &host, &mut r);
    }
}

#[test]
fn host_gradient_sums_are_the_device_bits() {
    let Some(c) = gpu() else { return };
    let mut r = Rng::new("cuda_host_placement grads");
    for tied in [false, true] {
        let cfg = init::tiny_config(128, 2, 2, 1, 96, 96, tied);
        let host = Model::random(&c, cfg.clone(), r.next())
            .unwrap()
            .to_host(&c)
            .unwrap();
        pl::check_host_grads(&c, &cfg, &host, tied, &mut r);
    }
}

#[test]
fn grpo_with_host_reference_and_grads_matches_the_device_placement_including_resume() {
    if gpu().is_none() {
        return;
    }
    let all = virtual_gpu();
    let tmp = tempfile::tempdir().unwrap();
    let mut r = Rng::new("cuda_host_placement grpo");
    let case = pl::grpo_case((128, 2, 1, 96), false, r.next());
    let seed = r.next() % 1000;
    let mk = || gpu().unwrap();
    let dev = pl::device_placement();
    let want = pl::grpo_weights(&mk, &case, &tmp.path().join("d"), dev, None, seed);
    assert_ne!(want, case.host, "training did not change the parameters");
    let mut host = dev;
    host.grads = Place::Host;
    host.reference = Place::Host;
    let got = pl::grpo_weights(&mk, &case, &tmp.path().join("h"), host, None, seed);
    same(&want, &got, "GRPO weights, host grads and reference");
    if all {
        // Everything on the host for 2 steps, resumed on the device for 2.
        host.optimizer = Place::Host;
        let got = pl::grpo_weights(&mk, &case, &tmp.path().join("hd"), host, Some(dev), seed);
        same(
            &want,
            &got,
            "GRPO weights, all on the host then resumed on the device",
        );
    }
}

#[test]
fn sft_with_host_grads_matches_the_device_placement() {
    if gpu().is_none() {
        return;
    }
    let all = virtual_gpu();
    let mut r = Rng::new("cuda_host_placement sft");
    let cfg = init::tiny_config(128, 2, 2, 1, 96, 96, true);
    let host = init::random_params(&cfg, r.next());
    let items = pl::sft_items(&mut r, cfg.vocab_size);
    let want = pl::sft_weights(gpu().unwrap(), &cfg, &host, &items, pl::device_placement());
    assert_ne!(want, host);
    for p in pl::host_placements(false) {
        if p.optimizer == Place::Host && !all {
            continue;
        }
        let got = pl::sft_weights(gpu().unwrap(), &cfg, &host, &items, p);
        same(&want, &got, &format!("SFT weights, {p:?}"));
    }
}
