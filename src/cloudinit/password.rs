//! SHA-512 crypt (`$6$`) hashes for the default user's password, so the
//! plaintext never reaches the seed ISO.

use sha_crypt::{PasswordHasher, ShaCrypt};

use super::CloudInitError;

/// Salt length in bytes. sha-crypt 0.6 base64-encodes the salt bytes and hashes
/// over the encoded text; 12 bytes encode to exactly 16 characters, the most
/// SHA-crypt uses. With more bytes (its own `hash_password` uses 16 → 22 chars)
/// the emitted salt is longer than the one hashed, and libxcrypt's `crypt()`
/// (what PAM uses at login) computes a different string: the login fails.
pub const SALT_LEN: usize = 12;

/// Hashes `password` with SHA-512 crypt and rounds=5000, giving
/// `$6$rounds=5000$<16 salt chars>$<86 hash chars>`, which `chpasswd -e` and
/// libxcrypt accept.
pub fn sha512_crypt(password: &str, salt: [u8; SALT_LEN]) -> Result<String, CloudInitError> {
    let hash = ShaCrypt::default()
        .hash_password_with_salt(password.as_bytes(), &salt)
        .map_err(CloudInitError::Hash)?;
    Ok(hash.as_str().to_owned())
}

/// Fresh salt bytes from the operating system's RNG.
///
/// Returns an error rather than panicking: the plugin serves many tasks and
/// must not abort on a (very unlikely) RNG failure.
pub fn random_salt() -> Result<[u8; SALT_LEN], CloudInitError> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).map_err(CloudInitError::Random)?;
    Ok(salt)
}

#[cfg(test)]
mod tests {
    //! Hashes checked against libc's crypt() (through perl) are in
    //! tests/cloudinit_host_tools.rs.

    use super::*;
    use sha_crypt::PasswordVerifier;

    /// Known-good vector, computed once outside Rust. The salt text is
    /// sha-crypt's base64 of the bytes 0..=11; both of these print the hash:
    /// `perl -e 'print crypt("correct horse battery staple", q($6$rounds=5000$.2U.1EE/4Q.07ck0$))'`
    /// (libxcrypt, what PAM uses) and
    /// `openssl passwd -6 -salt .2U.1EE/4Q.07ck0 'correct horse battery staple'`
    /// (same hash, without the redundant default `rounds=5000` field).
    const VECTOR_SALT: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const VECTOR_PASSWORD: &str = "correct horse battery staple";
    const VECTOR_HASH: &str = "$6$rounds=5000$.2U.1EE/4Q.07ck0$\
        tkYIfexLVX0XnWlrfzUlPf9wbAkdkvcv.G/jI39oslBCvObqU2gsySRrk8SQ8qhudvtkMQuY1khL5JOQy6tjg/";

    #[test]
    fn fixed_salt_matches_known_vector() {
        let hash = sha512_crypt(VECTOR_PASSWORD, VECTOR_SALT).unwrap();
        assert_eq!(hash, VECTOR_HASH);
    }

    #[test]
    fn shape_is_sha512_with_16_salt_chars() {
        let hash = sha512_crypt("pw", [7u8; 12]).unwrap();
        let parts: Vec<&str> = hash.split('$').collect();
        assert_eq!(parts[..3], ["", "6", "rounds=5000"]);
        assert_eq!(parts[3].len(), 16, "salt must be 16 chars: {hash}");
        assert_eq!(parts[4].len(), 86, "SHA-512 crypt hash is 86 chars: {hash}");
        ShaCrypt::default()
            .verify_password(b"pw", hash.as_str())
            .expect("sha-crypt verifies its own hash");
    }

    #[test]
    fn random_salts_differ() {
        assert_ne!(random_salt().unwrap(), random_salt().unwrap());
    }
}
