//! The op-family profiler. One test function: the profiler's switch and totals are process-wide,
//! so parallel tests in this binary would record into each other's totals.

use std::time::Duration;

use plr_engine::ops::conv::Conv2dCfg;
use plr_engine::ops::elementwise;
use plr_engine::profile::{self, Family, Phase};
use plr_engine::rng::Rng;
use plr_engine::{Tape, Tensor};

fn calls(p: &profile::Profile, f: Family, ph: Phase) -> u64 {
    p.get(f, ph).calls
}

#[test]
fn profiler_charges_outermost_family_and_phase() {
    let mut rng = Rng::new(7);
    let x = Tensor::randn(&[2, 3, 8, 8], 1.0, &mut rng);
    let w = Tensor::randn(&[4, 3, 3, 3], 0.5, &mut rng);

    // Off: nothing is recorded.
    profile::reset();
    let run = |x: &Tensor, w: &Tensor| {
        let mut tape = Tape::new();
        let xv = tape.leaf(x.clone());
        let wv = tape.leaf(w.clone());
        let y = tape.conv2d(&xv, &wv, None, Conv2dCfg::new(1, 1, 1)).unwrap();
        let y = tape.relu(&y).unwrap();
        let s = tape.sum_all(&y).unwrap();
        tape.backward(&s).unwrap();
    };
    run(&x, &w);
    assert_eq!(profile::snapshot(), profile::Profile::default());

    // On: one conv forward; its data and filter gradients in the backward phase; relu both ways.
    profile::set_enabled(true);
    run(&x, &w);
    profile::set_enabled(false);
    let p = profile::snapshot();
    assert_eq!(calls(&p, Family::Conv, Phase::Forward), 1);
    assert_eq!(calls(&p, Family::Conv, Phase::Backward), 2);
    assert_eq!(calls(&p, Family::Elementwise, Phase::Forward), 2, "relu and sum_all");
    assert!(calls(&p, Family::Elementwise, Phase::Backward) >= 1, "relu backward");
    assert_eq!(calls(&p, Family::BatchNorm, Phase::Forward) + calls(&p, Family::BatchNorm, Phase::Backward), 0);
    assert!(p.total() > Duration::ZERO);

    // A scope opened inside another is charged to the outer one, with the inner work's time.
    profile::reset();
    profile::set_enabled(true);
    {
        let _outer = profile::scope(Family::Optim);
        elementwise::add(&x, &x).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    profile::set_enabled(false);
    let p = profile::snapshot();
    assert_eq!(calls(&p, Family::Optim, Phase::Forward), 1);
    assert_eq!(calls(&p, Family::Elementwise, Phase::Forward), 0);
    assert!(p.get(Family::Optim, Phase::Forward).time >= Duration::from_millis(20));

    // The backward phase lasts exactly as long as its guard; after the nested scope above, a
    // top-level scope is outermost again.
    profile::reset();
    profile::set_enabled(true);
    {
        let _g = profile::backward_phase();
        elementwise::scale(&x, 2.0).unwrap();
    }
    elementwise::scale(&x, 2.0).unwrap();
    profile::set_enabled(false);
    let p = profile::snapshot();
    assert_eq!(calls(&p, Family::Elementwise, Phase::Backward), 1);
    assert_eq!(calls(&p, Family::Elementwise, Phase::Forward), 1);
}
