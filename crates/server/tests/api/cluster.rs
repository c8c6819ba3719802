//! The shared-store scripts against the real Redis (each test under its own key prefix):
//! fenced ownership and leases that are taken back only under the user's limit.

use std::time::Duration;

use atlas_server::cluster::{Claim, Cluster, Fenced, Owned, Refreshed};

const REDIS: &str = "redis://127.0.0.1:6379";

fn prefix() -> String {
    format!("atlas-test-{}", uuid::Uuid::new_v4().simple())
}

fn cluster(prefix: &str, max: u32) -> Cluster {
    Cluster::connect(
        REDIS,
        prefix,
        Duration::from_secs(15),
        Duration::from_secs(60),
        Duration::from_secs(1800),
        max,
    )
    .unwrap()
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Makes `session`'s lease look lapsed, as if its instance had stopped refreshing it.
async fn lapse(prefix: &str, user: &str, session: &str) {
    let mut conn = raw().await;
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{prefix}:leases:{user}"))
        .arg(1)
        .arg(session)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// What a refresh of `owned`'s lease did.
async fn refreshed(c: &Cluster, owned: &Owned) -> Fenced<Refreshed> {
    c.refresh(owned).await.unwrap()
}

/// Checks that the next refresh of `owned` re-asserts it (reporting the loss) and the one
/// after only extends it.
async fn assert_reasserted_then_extended(c: &Cluster, owned: &Owned) {
    assert_eq!(
        refreshed(c, owned).await,
        Fenced::Done(Refreshed::Reasserted)
    );
    assert_eq!(refreshed(c, owned).await, Fenced::Done(Refreshed::Extended));
}

async fn admit(c: &Cluster, user: &str, session: &str) -> Option<Owned> {
    c.admit(user, session).await.unwrap()
}

/// Admits `session` of `user` and registers its resume `token`.
async fn admit_with_token(c: &Cluster, user: &str, session: &str, token: &str) -> Owned {
    let owned = admit(c, user, session).await.unwrap();
    c.register_token(&owned, token).await.unwrap();
    owned
}

/// Claims the session behind `token`, pending its handshake.
async fn claim(c: &Cluster, token: &str, user: &str) -> (Owned, String, bool) {
    match c.claim(token, user).await.unwrap() {
        Claim::Pending {
            claim,
            owner,
            published,
        } => (claim, owner, published),
        other => panic!("the token resumes the session: {other:?}"),
    }
}

/// Forgets every key under `prefix`, as a Redis restarted without persistence would.
async fn lose_everything(prefix: &str) {
    let mut conn = raw().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_committed_claim_fences_every_write_of_the_previous_owner() {
    let p = prefix();
    let a = cluster(&p, 3);
    let b = cluster(&p, 3);
    let first = admit(&a, "u", "s1").await.expect("admitted");
    assert_eq!(first.epoch, 1);
    assert_eq!(
        a.register_token(&first, "t1").await.unwrap(),
        Fenced::Done(())
    );
    let (second, owner, published) = claim(&b, "t1", "u").await;
    assert_eq!(owner, a.instance);
    assert!(!published, "nothing was published yet");
    assert_eq!((second.session_id.as_str(), second.epoch), ("s1", 2));
    // Pending: the owner is untouched until the client's handshake is done.
    assert_eq!(
        refreshed(&a, &first).await,
        Fenced::Done(Refreshed::Extended)
    );
    assert_eq!(
        b.commit(&second).await.unwrap().map(|s| s.is_none()),
        Some(true)
    );
    // Every write of the stale owner is refused.
    assert_eq!(refreshed(&a, &first).await, Fenced::Stale);
    assert_eq!(a.add_spend(&first, 5).await.unwrap(), Fenced::Stale);
    assert_eq!(a.register_token(&first, "t9").await.unwrap(), Fenced::Stale);
    assert_eq!(a.retire_token(&first, "t1").await.unwrap(), Fenced::Stale);
    assert_eq!(a.release(&first).await.unwrap(), Fenced::Stale);
    // The new owner's go through.
    assert_eq!(
        refreshed(&b, &second).await,
        Fenced::Done(Refreshed::Extended)
    );
    assert_eq!(b.add_spend(&second, 5).await.unwrap(), Fenced::Done(5));
    // The stale owner's token was not retired; a later claim still finds the session.
    let (third, _, _) = claim(&a, "t1", "u").await;
    assert_eq!(third.epoch, 3);
    assert!(a.commit(&third).await.unwrap().is_some());
    assert_eq!(refreshed(&b, &second).await, Fenced::Stale);
    assert_eq!(a.release(&third).await.unwrap(), Fenced::Done(()));
    assert!(matches!(a.claim("t1", "u").await.unwrap(), Claim::Unknown));
    // A stale owner that never learned meets the ended session's epoch, not an absence it
    // would re-assert as lost data (found by the simulation, seed 3).
    assert_eq!(refreshed(&b, &second).await, Fenced::Stale);
    assert_eq!(refreshed(&a, &first).await, Fenced::Stale);
}

#[tokio::test]
async fn a_resume_that_never_completes_leaves_the_session_with_its_owner() {
    let p = prefix();
    let a = cluster(&p, 3);
    let b = cluster(&p, 3);
    let owned = admit_with_token(&a, "u", "s1", "t1").await;
    // B accepts a resume upgrade, and the client is lost before its session.start.
    let (pending, _, _) = claim(&b, "t1", "u").await;
    b.abandon(&pending).await.unwrap();
    assert!(b.commit(&pending).await.unwrap().is_none(), "abandoned");
    // The owner never noticed: every write of its goes through.
    assert_eq!(
        refreshed(&a, &owned).await,
        Fenced::Done(Refreshed::Extended)
    );
    assert_eq!(a.add_spend(&owned, 5).await.unwrap(), Fenced::Done(5));
    // Racing claims: only the latest can commit.
    let (early, _, _) = claim(&b, "t1", "u").await;
    let (late, _, _) = claim(&a, "t1", "u").await;
    assert!(late.epoch > early.epoch);
    assert!(!b.commit_here(&early).await.unwrap());
    // The owner's own resume: committed without reading the state back.
    assert!(a.commit_here(&late).await.unwrap());
    assert!(!a.commit_here(&late).await.unwrap(), "a claim commits once");
    // A session that ended while a claim was pending cannot be committed into a second life.
    let (pending, _, _) = claim(&b, "t1", "u").await;
    a.release(&late).await.unwrap();
    assert!(b.commit(&pending).await.unwrap().is_none());
}

#[tokio::test]
async fn an_owner_re_asserts_a_session_the_store_lost() {
    let p = prefix();
    let a = cluster(&p, 3);
    let owned = admit_with_token(&a, "u", "s1", "t1").await;
    // Redis restarts empty: absence is not a sign of another owner.
    lose_everything(&p).await;
    assert_reasserted_then_extended(&a, &owned).await;
    // Every other write re-asserts too instead of ending the session, and the next refresh
    // still reports the loss (so the owner publishes its state and tokens again): a spend
    // landing first must not hide it.
    lose_everything(&p).await;
    assert_eq!(a.add_spend(&owned, 5).await.unwrap(), Fenced::Done(5));
    assert_reasserted_then_extended(&a, &owned).await;
    assert_eq!(
        a.register_token(&owned, "t1").await.unwrap(),
        Fenced::Done(())
    );
    // The re-registered token resumes it again, and a committed claim still fences the
    // re-asserted owner.
    let (claim, _, _) = claim(&a, "t1", "u").await;
    assert_eq!(claim.epoch, 2);
    assert!(a.commit(&claim).await.unwrap().is_some());
    assert_eq!(refreshed(&a, &owned).await, Fenced::Stale);
}

#[tokio::test]
async fn tokens_resume_only_their_user_s_sessions() {
    let p = prefix();
    let a = cluster(&p, 3);
    let owned = admit_with_token(&a, "alice", "s1", "t1").await;
    assert!(matches!(
        a.claim("t1", "mallory").await.unwrap(),
        Claim::Unknown
    ));
    assert!(matches!(
        a.claim("nope", "alice").await.unwrap(),
        Claim::Unknown
    ));
    assert_eq!(
        refreshed(&a, &owned).await,
        Fenced::Done(Refreshed::Extended)
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_back_only_under_the_limit() {
    let p = prefix();
    let a = cluster(&p, 3);
    let s1 = admit_with_token(&a, "u", "s1", "t1").await;
    admit(&a, "u", "s2").await.unwrap();
    admit(&a, "u", "s3").await.unwrap();
    assert!(admit(&a, "u", "s4").await.is_none(), "three places taken");
    // s1's instance could not refresh it (Redis unreachable from there): its lease lapses
    // and a new session gets the place.
    lapse(&p, "u", "s1").await;
    let s4 = admit(&a, "u", "s4")
        .await
        .expect("the lapsed place is free");
    // s1's late refresh must not make it a fourth session, and neither may a resume.
    assert_eq!(refreshed(&a, &s1).await, Fenced::Done(Refreshed::NoPlace));
    assert!(matches!(a.claim("t1", "u").await.unwrap(), Claim::NoPlace));
    // Once a place is free again, a refresh takes it back.
    a.release(&s4).await.unwrap();
    assert_eq!(refreshed(&a, &s1).await, Fenced::Done(Refreshed::Extended));
    assert!(admit(&a, "u", "s5").await.is_none());
}

/// The simulation's shared store (`atlas_sim::store`) stands in for these scripts in a
/// million seeds: random operation sequences get the same answers from both, so the model
/// cannot drift from the scripts unnoticed.
#[tokio::test]
async fn the_scripts_answer_like_the_simulation_s_model() {
    use atlas_server::cluster::{Refreshed, ResumeState};
    use atlas_sim::store::{Refresh, Store, Write};

    const MAX: usize = 2;
    const TTL: u64 = 15_000;
    let state = ResumeState {
        session_id: String::new(),
        user_id: "u".into(),
        started_wall: chrono::Utc::now(),
        carried: Default::default(),
        turn_records: Vec::new(),
        tool_records: Vec::new(),
        conversation_id: None,
        client: None,
        trace: None,
    };
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..20 {
        let p = prefix();
        let nodes = [cluster(&p, MAX as u32), cluster(&p, MAX as u32)];
        let mut model = Store::default();
        // What each instance holds: (session, epoch) and its pending claim.
        let mut held: Vec<Owned> = Vec::new();
        let mut pending: Vec<(usize, Owned)> = Vec::new();
        let mut tokens: Vec<(String, u64)> = Vec::new();
        let mut fresh = 0u64;
        for step in 0..60 {
            let i = next(2) as usize;
            let node = &nodes[i];
            let ctx = format!("round {round} step {step} node {i}");
            match next(8) {
                0 => {
                    fresh += 1;
                    let real = node.admit("u", &fresh.to_string()).await.unwrap();
                    let modelled = model.admit(fresh, i, MAX, TTL, 0);
                    assert_eq!(real.is_some(), modelled, "{ctx}: admit");
                    held.extend(real);
                }
                1 | 2 => {
                    let Some(owned) = held.get(next(held.len().max(1) as u64) as usize).cloned()
                    else {
                        continue;
                    };
                    let sid: u64 = owned.session_id.parse().unwrap();
                    let token = format!("t{step}");
                    let real = node.register_token(&owned, &token).await.unwrap();
                    let modelled = model.fence(sid, owned.epoch, i);
                    if modelled != Write::Stale {
                        model.tokens.insert(token.clone(), sid);
                        tokens.push((token, sid));
                    }
                    assert_eq!(
                        real == Fenced::Stale,
                        modelled == Write::Stale,
                        "{ctx}: register"
                    );
                }
                3 => {
                    let Some((token, _)) = tokens
                        .get(next(tokens.len().max(1) as u64) as usize)
                        .cloned()
                    else {
                        continue;
                    };
                    let real = node.claim(&token, "u").await.unwrap();
                    let modelled = model.claim(&token, i, MAX, TTL, 15_000, 0);
                    match (real, modelled) {
                        (Claim::Unknown, Err(false)) | (Claim::NoPlace, Err(true)) => {}
                        (
                            Claim::Pending {
                                claim, published, ..
                            },
                            Ok((_, epoch, _, was)),
                        ) => {
                            assert_eq!((claim.epoch, published), (epoch, was), "{ctx}: claim");
                            pending.push((i, claim));
                        }
                        (real, modelled) => panic!("{ctx}: claim {real:?} vs {modelled:?}"),
                    }
                }
                4 => {
                    let Some((i, claim)) = pending.pop() else {
                        continue;
                    };
                    let sid: u64 = claim.session_id.parse().unwrap();
                    let real = nodes[i].commit(&claim).await.unwrap();
                    let modelled = model.commit(sid, claim.epoch, i, 0);
                    assert_eq!(real.is_some(), modelled.is_some(), "{ctx}: commit");
                    if real.is_some() {
                        held.push(claim);
                    }
                }
                5 => {
                    let Some(owned) = held.get(next(held.len().max(1) as u64) as usize).cloned()
                    else {
                        continue;
                    };
                    let sid: u64 = owned.session_id.parse().unwrap();
                    let real = node.refresh(&owned).await.unwrap();
                    let modelled = model.refresh(sid, owned.epoch, i, MAX, TTL, 0);
                    let expected = match modelled {
                        Refresh::Extended(false) => Fenced::Done(Refreshed::Extended),
                        Refresh::Extended(true) => Fenced::Done(Refreshed::Reasserted),
                        Refresh::NoPlace => Fenced::Done(Refreshed::NoPlace),
                        Refresh::Stale => Fenced::Stale,
                    };
                    assert_eq!(real, expected, "{ctx}: refresh");
                }
                6 => {
                    let Some(owned) = held.get(next(held.len().max(1) as u64) as usize).cloned()
                    else {
                        continue;
                    };
                    let sid: u64 = owned.session_id.parse().unwrap();
                    let (real, modelled) = if next(2) == 0 {
                        let real = node.release(&owned).await.unwrap();
                        (real, model.release(sid, owned.epoch, i))
                    } else {
                        let real = node.publish(&owned, &state).await.unwrap();
                        let w = model.fence(sid, owned.epoch, i);
                        if w != Write::Stale
                            && let Some(e) = model.sessions.get_mut(&sid)
                        {
                            e.state = Some(0);
                        }
                        (real, w)
                    };
                    assert_eq!(
                        real == Fenced::Stale,
                        modelled == Write::Stale,
                        "{ctx}: fenced write"
                    );
                }
                _ => {
                    if next(4) == 0 {
                        lose_everything(&p).await;
                        model.lose_everything(0);
                    }
                }
            }
        }
    }
}
