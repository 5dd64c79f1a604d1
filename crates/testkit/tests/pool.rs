//! The warm pool: each sandbox is handed out once, the pool refills, and
//! an idle pool shrinks to nothing.
//!
//! One test function, so no other test of this binary starts VMs in the
//! same run folder while it counts processes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use upstream_testkit::{processes_mentioning, require_vm, sh, thread_nice_values};
use upstream_vmm::{Limits, Pool, PoolConfig, Runtime, RuntimeOptions};

async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_hands_out_refills_and_shrinks() {
    let vm = require_vm!();
    let runtime = Arc::new(Runtime::open(vm.data.clone(), RuntimeOptions::default()).unwrap());
    let config = PoolConfig {
        size: 2,
        idle_timeout: Duration::from_secs(8),
        max_pools: 1,
    };
    let pool = Pool::new(runtime, config);
    let limits = Limits {
        vcpus: 1,
        memory_mib: 256,
        disk_mib: 256,
    };
    let mut spec = vm.spec(limits);

    // The first acquire finds the pool empty, creates directly and starts
    // the refill.
    let first = pool.acquire(spec.clone()).await.unwrap();
    wait_for("the pool to fill", Duration::from_secs(120), || {
        pool.ready() == 2
    })
    .await;

    // As root, refills run at background priority (nice 10) until taken.
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let pooled_nice: Vec<i32> = processes_mentioning(&vm.data.run())
        .into_iter()
        .filter(|&pid| !processes_mentioning(&vm.run_dir(&first)).contains(&pid))
        .flat_map(thread_nice_values)
        .collect();
    assert!(!pooled_nice.is_empty(), "no pooled VMM threads found");
    if root {
        assert!(
            pooled_nice.iter().all(|&nice| nice == 10),
            "{pooled_nice:?}"
        );
    }

    spec.env.push(("POOLED".into(), "yes".into()));
    let started = Instant::now();
    let second = pool.acquire(spec.clone()).await.unwrap();
    let acquire_time = started.elapsed();
    let third = pool.acquire(spec.clone()).await.unwrap();

    assert!(
        acquire_time < Duration::from_millis(100),
        "acquiring a ready sandbox took {acquire_time:?}"
    );
    let taken_nice: Vec<i32> = processes_mentioning(&vm.run_dir(&second))
        .into_iter()
        .flat_map(thread_nice_values)
        .collect();
    assert!(
        !taken_nice.is_empty(),
        "no VMM threads of the taken sandbox"
    );
    assert!(taken_nice.iter().all(|&nice| nice == 0), "{taken_nice:?}");
    let ids: HashSet<_> = [first.id(), second.id(), third.id()].into_iter().collect();
    assert_eq!(ids.len(), 3, "a sandbox was handed out twice");
    let (stdout, _, status) = sh(&second, "echo $POOLED").await;
    assert_eq!(status.code, Some(0));
    assert_eq!(
        stdout, b"yes\n",
        "the acquiring spec's environment is not applied"
    );

    wait_for("the pool to refill", Duration::from_secs(120), || {
        pool.ready() == 2
    })
    .await;
    for sandbox in [first, second, third] {
        sandbox.destroy().await;
    }

    // Nothing is acquired any more: after the idle timeout the pool
    // destroys its ready sandboxes.
    wait_for("the idle pool to shrink", Duration::from_secs(30), || {
        pool.ready() == 0
    })
    .await;
    wait_for("the pooled VMs to exit", Duration::from_secs(10), || {
        processes_mentioning(&vm.data.run()).is_empty()
    })
    .await;

    // An acquire after shrinking starts the pool again; shutdown destroys
    // what it filled.
    let again = pool.acquire(spec.clone()).await.unwrap();
    wait_for("the pool to fill again", Duration::from_secs(120), || {
        pool.ready() >= 1
    })
    .await;
    again.destroy().await;
    pool.shutdown().await;
    assert_eq!(pool.ready(), 0);
    wait_for("every VM to exit", Duration::from_secs(10), || {
        processes_mentioning(&vm.data.run()).is_empty()
    })
    .await;
    let left: Vec<_> = std::fs::read_dir(vm.data.run())
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "run folders left behind: {left:?}");
}
