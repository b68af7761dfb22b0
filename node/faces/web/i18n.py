"""The web pages' words, in French (the default) and English: one small catalogue, no library.

`translator(lang)` gives the `t(key, **values)` the templates call; a key missing
from the catalogue shows as itself, so a forgotten entry is visible, never a crash.
The chosen language lives in the `cabinet_lang` cookie (set by POST /lang).
"""

from __future__ import annotations

from typing import Callable

LANGS = ("fr", "en")
DEFAULT = "fr"
COOKIE = "cabinet_lang"

# key: (français, English)
CATALOGUE: dict[str, tuple[str, str]] = {
    "app": ("Cabinet", "Cabinet"),
    "skip": ("Aller au contenu", "Skip to content"),
    "nav": ("Navigation principale", "Main navigation"),
    "inbox": ("Réception", "Inbox"),
    "compose": ("Nouvel adressage", "New referral"),
    "outbox": ("Envois", "Outbox"),
    "contacts": ("Confrères", "Colleagues"),
    "status": ("État", "Status"),
    "sign_out": ("Se déconnecter", "Sign out"),
    "language": ("Langue", "Language"),
    "switch_lang": ("English", "Français"),
    "notify_on": ("Activer les notifications", "Turn on notifications"),
    "notify_done": ("Notifications activées", "Notifications on"),
    "notify_denied": ("Notifications refusées par le navigateur", "Notifications blocked by the browser"),
    "unread_badge": ("{n} non lu(s)", "{n} unread"),
    "new_record": ("Un nouveau dossier est arrivé.", "A new record has arrived."),
    "show_new": ("Afficher", "Show"),
    "signed_in_as": ("Connecté : {who} ({role})", "Signed in: {who} ({role})"),
    "practitioner": ("praticien", "practitioner"),
    "secretary": ("secrétariat", "secretary"),
    # sign in
    "sign_in": ("Connexion", "Sign in"),
    "account": ("Compte", "Account"),
    "password": ("Mot de passe", "Password"),
    "sign_in_button": ("Se connecter", "Sign in"),
    "sign_in_failed": ("Compte ou mot de passe incorrect.", "Wrong account or password."),
    "sign_in_wait": ("Trop d'essais : réessayez dans {s} s.", "Too many attempts: try again in {s} s."),
    # the page lock (lock.html)
    "locked_title": ("Session verrouillée", "Session locked"),
    "locked_text": ("La page s'est verrouillée après un temps sans activité. {who}, saisissez à nouveau "
                    "votre mot de passe pour reprendre là où vous en étiez.",
                    "The page locked itself after a while without activity. {who}, type your password "
                    "again to carry on where you were."),
    "unlock_button": ("Déverrouiller", "Unlock"),
    "unlock_failed": ("Mot de passe incorrect.", "Wrong password."),
    "locked_sign_out": ("Ce n'est pas moi : se déconnecter", "Not me: sign out"),
    "lock_now": ("Verrouiller", "Lock"),
    "session_over": ("Votre session a expiré : reconnectez-vous.", "Your session has ended: sign in again."),
    # inbox
    "filters": ("Rechercher", "Search"),
    "patient": ("Patient", "Patient"),
    "patient_hint": ("nom et prénom, dans n'importe quel ordre", "any words of the name, any order"),
    "born": ("Date de naissance", "Date of birth"),
    "date_hint": ("jj/mm/aaaa", "dd/mm/yyyy"),
    "sender": ("Expéditeur", "Sender"),
    "since": ("Reçu depuis le", "Received from"),
    "until": ("Jusqu'au", "Until"),
    "unread_only": ("Non lus seulement", "Unread only"),
    "search": ("Rechercher", "Search"),
    "clear": ("Effacer", "Clear"),
    "no_records": ("Aucun dossier.", "No records."),
    "received": ("Reçu", "Received"),
    "subject": ("Objet", "Subject"),
    "files": ("Pièces jointes", "Attachments"),
    "state": ("État", "State"),
    "unread": ("non lu", "unread"),
    "read": ("lu", "read"),
    "results": ("{n} dossier(s)", "{n} record(s)"),
    "reply_kind": ("compte-rendu", "report"),
    # record
    "record": ("Dossier", "Record"),
    "letter": ("Courrier", "Letter"),
    "details": ("Détails", "Details"),
    "from": ("De", "From"),
    "to": ("À", "To"),
    "date": ("Date", "Date"),
    "size": ("Taille", "Size"),
    "name": ("Nom", "Name"),
    "preview": ("Aperçu", "Preview"),
    "download": ("Télécharger", "Download"),
    "preview_of": ("Aperçu de {name}", "Preview of {name}"),
    "no_preview": ("pas d'aperçu pour ce type de fichier", "no preview for this kind of file"),
    "thread": ("Échanges sur ce dossier", "Thread"),
    "this_one": ("(celui-ci)", "(this one)"),
    "receipts": ("Accusés de remise et de lecture", "Delivery and read receipts"),
    "reply": ("Répondre (compte-rendu)", "Reply (report)"),
    "reply_letter": ("Compte-rendu", "Report"),
    "send_reply": ("Envoyer le compte-rendu", "Send the report"),
    "no_letters": ("Le rôle secrétariat ne permet pas d'ouvrir les courriers ni les pièces jointes.",
                   "The secretary role may not open letters or attachments."),
    "data": ("Données structurées", "Structured data"),
    # compose
    "recipients": ("Destinataires", "Recipients"),
    "add_recipient": ("Ajouter un destinataire (nom ou ville)", "Add a recipient (name or city)"),
    "add": ("Ajouter", "Add"),
    "remove": ("Retirer", "Remove"),
    "none_yet": ("Aucun destinataire choisi.", "No recipient chosen yet."),
    "letter_text": ("Courrier (texte)", "Letter (text)"),
    "letter_file": ("… ou le courrier en fichier (PDF, Word)", "… or the letter as a file (PDF, Word)"),
    "attachments": ("Pièces jointes", "Attachments"),
    "drop_here": ("Déposez des fichiers ici, ou choisissez-les :", "Drop files here, or choose them:"),
    "choose_files": ("Choisir des fichiers", "Choose files"),
    "send": ("Envoyer", "Send"),
    "upload": ("Envoi vers votre serveur", "Upload to your node"),
    "per_recipient": ("Transmission à chaque destinataire", "Delivery to each recipient"),
    "sent_ok": ("Le dossier est chiffré et en cours de transmission. Vous pouvez fermer cette page : "
                "le serveur du cabinet continue, et la page Envois montre où il en est.",
                "The record is sealed and on its way. You may close this page: the practice's node carries "
                "on, and the Outbox shows where it is."),
    "upload_failed": ("L'envoi a échoué : {why}", "Sending failed: {why}"),
    "unknown_contact": ("Choisissez un confrère dans la liste.", "Pick a colleague from the list."),
    "pick_one": ("Choisissez au moins un destinataire.", "Choose at least one recipient."),
    "upload_warn": ("Ne fermez pas la page avant la fin de la barre « Envoi vers votre serveur ».",
                    "Keep this page open until the “Upload to your node” bar is full."),
    # outbox
    "queued": ("en attente", "queued"),
    "sending": ("en cours", "sending"),
    "delivered": ("remis", "delivered"),
    "opened": ("ouvert", "opened"),
    "refused": ("refusé", "refused"),
    "why": ("Pourquoi", "Why"),
    "attempts": ("Essais", "Attempts"),
    "updated": ("Mis à jour", "Updated"),
    "recipient": ("Destinataire", "Recipient"),
    "progress": ("Progression", "Progress"),
    "nothing_sent": ("Rien n'a encore été envoyé.", "Nothing sent yet."),
    "waiting_first": ("premier essai imminent", "first attempt about to start"),
    # contacts
    "directory": ("Annuaire", "Directory"),
    "directory_hint": ("nom, spécialité, ville ou RPPS", "name, specialty, city or RPPS"),
    "add_by": ("Ajouter par identifiant de nœud ou fiche collée", "Add by node ID or pasted descriptor"),
    "source": ("Identifiant de nœud, ou fiche (même dans le texte d'un courriel)",
               "Node ID, or descriptor (even inside an e-mail's text)"),
    "display_name": ("Nom affiché (facultatif)", "Display name (optional)"),
    "specialty": ("Spécialité", "Specialty"),
    "city": ("Ville", "City"),
    "trust": ("Confiance", "Trust"),
    "verified": ("vérifié", "verified"),
    "unverified": ("non vérifié", "not verified"),
    "revoked": ("RÉVOQUÉ : clés déclarées perdues ou volées, plus rien ne lui est envoyé",
                "REVOKED: keys declared lost or stolen, nothing is sent to them any more"),
    "held": ("ATTENTION : nouvelle clé d'identité. Rien ne lui est envoyé avant votre confirmation.",
             "WARNING: new identity key. Nothing is sent to it until you confirm."),
    "held_help": ("Appelez ce confrère à un numéro que vous connaissez, comparez le code de sécurité, "
                  "puis confirmez.", "Call this colleague on a number you already know, compare the "
                  "safety code, then confirm."),
    "confirm_key": ("J'ai comparé le code : confirmer la nouvelle clé", "I compared the code: confirm the new key"),
    "safety": ("Code de sécurité", "Safety code"),
    "safety_help": ("Comparez ce code avec votre confrère (par téléphone ou en personne) : il doit être "
                    "identique des deux côtés.", "Compare this code with your colleague (by phone or in "
                    "person): it must be the same on both sides."),
    "qr_help": ("QR code de votre fiche, à faire scanner par le confrère.",
                "QR code of your own descriptor, for the colleague to scan."),
    "mark_verified": ("Le code est identique : marquer vérifié", "The code matches: mark verified"),
    "open": ("Ouvrir", "Open"),
    "added": ("Confrère ajouté.", "Colleague added."),
    "already": ("Ce confrère est déjà dans vos contacts.", "This colleague is already a contact."),
    "no_contacts": ("Aucun confrère pour l'instant.", "No colleagues yet."),
    "no_results": ("Aucun résultat.", "No results."),
    "conflict": ("attention : même RPPS ou même nom et ville qu'une autre fiche",
                 "careful: same RPPS or same name and city as another entry"),
    "node_id": ("Identifiant du nœud", "Node ID"),
    # status
    "addresses": ("Adresses", "Addresses"),
    "queued_count": ("En attente d'envoi", "Waiting to be sent"),
    "oldest": ("Plus ancien non remis", "Oldest undelivered"),
    "disk_free": ("Espace disque libre", "Free disk space"),
    "audit": ("Journal d'audit", "Audit log"),
    "audit_ok": ("intact (chaîne de hachage vérifiée)", "intact (hash chain checked)"),
    "audit_broken": ("ENDOMMAGÉ à l'entrée {n}", "BROKEN at entry {n}"),
    "audit_head": ("Télécharger la tête signée du journal", "Download the log's signed head"),
    "serving": ("Reçoit des connexions", "Accepting connections"),
    "yes": ("oui", "yes"),
    "no": ("non", "no"),
    "none": ("aucun", "none"),
    "error": ("Erreur", "Error"),
    "back": ("Retour", "Back"),
    # inbox pages
    "results_page": ("{n} dossier(s), dont {unread} non lu(s) · page {page} sur {pages}",
                     "{n} record(s), {unread} unread · page {page} of {pages}"),
    "pages": ("Pages", "Pages"),
    "prev_page": ("← Page précédente", "← Previous page"),
    "next_page": ("Page suivante →", "Next page →"),
    "page_of": ("Page {page} sur {pages}", "Page {page} of {pages}"),
    # patients
    "patients": ("Patients", "Patients"),
    "practitioners_only": ("Réservé aux praticiens.", "Practitioners only."),
    "enroll": ("Inscrire un patient", "Enrol a patient"),
    "enroll_help": ("Une clé est créée pour le patient et imprimée sur sa carte ; le cabinet ne garde que la "
                    "clé publique.", "A key is made for the patient and printed on their card; the practice "
                    "keeps only the public key."),
    "patient_ref": ("Référence patient", "Patient reference"),
    "patient_ref_hint": ("un numéro, jamais un nom ; vide : une référence est choisie",
                         "a number, never a name; empty: one is chosen"),
    "enroll_button": ("Inscrire et imprimer la carte", "Enrol and print the card"),
    "enrolled_patients": ("Patients inscrits", "Enrolled patients"),
    "no_patients": ("Aucun patient inscrit.", "No patient enrolled."),
    "key_id": ("Clé", "Key"),
    "enrolled_on": ("Inscrit le", "Enrolled"),
    "break_glass": ("Accès d'urgence sans autorisation", "Emergency access without a grant"),
    "break_glass_help": ("Un confrère autorisé ici peut obtenir les dossiers d'un patient en urgence, avec un motif "
                         "écrit ; chaque accès est signalé et figure dans l'historique du patient.",
                         "A colleague allowed here may obtain a patient's records in an emergency, with a written "
                         "reason; each access is flagged and listed in the patient's history."),
    "break_glass_now": ("Autorisé aujourd'hui pour :", "Allowed now for:"),
    "nobody": ("personne", "nobody"),
    "any_contact": ("tout confrère", "any colleague"),
    "who_may": ("Confrère", "Colleague"),
    "allow": ("Autoriser", "Allow"),
    "deny": ("Retirer", "Deny"),
    "emergencies": ("Accès d'urgence et refus", "Emergency accesses and refusals"),
    "event": ("Événement", "Event"),
    "by": ("Par", "By"),
    "reason": ("Motif", "Reason"),
    "linked_records": ("Dossiers rattachés", "Linked records"),
    "grants": ("Autorisations utilisées", "Grants used"),
    "grant": ("Autorisation", "Grant"),
    "scope": ("Portée", "Scope"),
    "uses": ("Utilisations", "Uses"),
    "last_used": ("Dernière utilisation", "Last used"),
    "valid": ("valide", "valid"),
    "revoked_on": ("révoquée le {when}", "revoked on {when}"),
    "no_grants": ("Aucune autorisation utilisée.", "No grant used."),
    "access_history": ("Historique des accès (signé)", "Access history (signed)"),
    "history_signed": ("Signé par ce cabinet jusqu'à l'entrée {seq} du journal, le {when}.",
                       "Signed by this practice up to audit entry {seq}, on {when}."),
    "this_practice": ("ce cabinet", "this practice"),
    "card": ("Carte patient", "Patient card"),
    "card_title": ("Carte patient {ref}", "Patient card {ref}"),
    "card_once": ("Cette carte n'est montrée qu'une fois : imprimez-la et remettez-la au patient.",
                  "This card is shown once: print it and hand it to the patient."),
    "card_qr": ("Le patient garde cette carte : elle signe les autorisations d'accès à son dossier.",
                "The patient keeps this card: it signs grants to their records."),
    "card_keep": ("À conserver en lieu sûr. Perdue : le cabinet en fait une nouvelle.",
                  "Keep it safe. Lost: the practice makes a new one."),
    "print": ("Imprimer", "Print"),
    "link_to_patient": ("Rattacher à un patient", "Link to a patient"),
    "category": ("Catégorie", "Category"),
    "category_hint": ("facultatif, ex. cardiologie", "optional, e.g. cardiology"),
    "link_button": ("Rattacher", "Link"),
    "linked_ok": ("Dossier rattaché au patient.", "Record linked to the patient."),
    # status
    "open_alerts": ("Alertes ouvertes", "Open alerts"),
    "reachability": ("Joignabilité", "Reachability"),
    "router_door": ("Port du routeur", "Router port"),
    "relays": ("Relais", "Relays"),
    "relay_state": ("{n} enregistrement(s)", "{n} registration(s)"),
    "bootstraps": ("Annuaires", "Directories"),
    "lan_peers": ("Réseau local", "Local network"),
    "lan_off": ("découverte locale arrêtée", "local discovery off"),
}


def pick(value: str | None) -> str:
    return value if value in LANGS else DEFAULT


def translator(lang: str) -> Callable[..., str]:
    column = LANGS.index(pick(lang))

    def t(key: str, **values: object) -> str:
        pair = CATALOGUE.get(key)
        text = pair[column] if pair else key
        return text.format(**values) if values else text
    return t
