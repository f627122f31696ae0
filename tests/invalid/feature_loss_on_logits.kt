# feature_loss_on_logits.kt: a loss between layers on an edge between outputs
# expect: E320
graph feature_loss_on_logits
data digits { val_split = 300 }
node student : resnet20 [target]
node teacher : wrn16_2 [frozen]
label -> student : through
teacher -> student : through at(p=2)
