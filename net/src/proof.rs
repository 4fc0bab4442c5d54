//! Proof of a shared secret for the handshakes of the data links
//! ([`crate::link`]) and the control connections ([`crate::control`]).
//!
//! A side proves it knows the secret without sending it: HMAC-SHA256 keyed
//! with the secret over a role label (so that a proof for one plane or one
//! role is worthless for another), the peer's challenge nonce, its own
//! response nonce, and whatever else the protocol binds (a peer id).

use std::io;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::NetError;
use crate::frame::{HELLO_NONCE_SIZE, HELLO_PROOF_SIZE};

/// A fresh nonce from the operating system's randomness.
pub(crate) fn random_nonce() -> Result<[u8; HELLO_NONCE_SIZE], NetError> {
    let mut nonce = [0; HELLO_NONCE_SIZE];
    getrandom::getrandom(&mut nonce).map_err(|error| {
        NetError::io(
            "draw a handshake nonce",
            io::Error::other(error.to_string()),
        )
    })?;
    Ok(nonce)
}

fn mac(secret: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac
}

/// The proof over `parts` (role, challenge, response, ...).
pub(crate) fn prove(secret: &[u8], parts: &[&[u8]]) -> [u8; HELLO_PROOF_SIZE] {
    mac(secret, parts).finalize().into_bytes().into()
}

/// Whether `proof` is the proof over `parts`, compared in constant time.
pub(crate) fn holds(secret: &[u8], parts: &[&[u8]], proof: &[u8]) -> bool {
    mac(secret, parts).verify_slice(proof).is_ok()
}
